//! Reads the exit data KVM leaves in the shared `kvm_run` page for the exits kvm-ioctls reports
//! without detail (internal errors). All union access of this crate is here.

use kvm_bindings::{
    kvm_run, KVM_EXIT_INTERNAL_ERROR, KVM_INTERNAL_ERROR_EMULATION, KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES,
};

/// Details of a KVM_EXIT_INTERNAL_ERROR.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InternalError {
    /// KVM_INTERNAL_ERROR_* suberror.
    pub suberror: u32,
    /// Instruction bytes at RIP, when KVM provided them (emulation failures with
    /// KVM_CAP_EXIT_ON_EMULATION_FAILURE).
    pub insn: Option<Vec<u8>>,
    /// Raw data words of the exit.
    pub data: Vec<u64>,
}

/// Name of a KVM_INTERNAL_ERROR_* suberror.
pub fn suberror_name(s: u32) -> &'static str {
    match s {
        1 => "KVM_INTERNAL_ERROR_EMULATION",
        2 => "KVM_INTERNAL_ERROR_SIMUL_EX",
        3 => "KVM_INTERNAL_ERROR_DELIVERY_EV",
        4 => "KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON",
        _ => "unknown suberror",
    }
}

/// Reads the internal-error data of the last exit; None if the last exit was something else.
pub fn internal_error(run: &kvm_run) -> Option<InternalError> {
    if run.exit_reason != KVM_EXIT_INTERNAL_ERROR {
        return None;
    }
    // SAFETY: exit_reason is KVM_EXIT_INTERNAL_ERROR, so KVM wrote the `internal` member of the
    // union; both `internal` and `emulation_failure` are plain integer structs that overlay the
    // same bytes, so any bit pattern is a valid value of either.
    let internal = unsafe { run.__bindgen_anon_1.internal };
    let ndata = (internal.ndata as usize).min(internal.data.len());
    let mut insn = None;
    if internal.suberror == KVM_INTERNAL_ERROR_EMULATION {
        // SAFETY: as above; for emulation failures KVM fills the emulation_failure layout.
        let ef = unsafe { run.__bindgen_anon_1.emulation_failure };
        if ef.flags & u64::from(KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES) != 0 {
            // SAFETY: the union inside emulation_failure has a single plain-bytes member.
            let bytes = unsafe { ef.__bindgen_anon_1.__bindgen_anon_1 };
            let n = usize::from(bytes.insn_size).min(bytes.insn_bytes.len());
            insn = Some(bytes.insn_bytes[..n].to_vec());
        }
    }
    Some(InternalError { suberror: internal.suberror, insn, data: internal.data[..ndata].to_vec() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_emulation_failure_bytes() {
        // SAFETY: kvm_run is plain data; all-zero is a valid value.
        let mut run: kvm_run = unsafe { std::mem::zeroed() };
        assert_eq!(internal_error(&run), None);
        run.exit_reason = KVM_EXIT_INTERNAL_ERROR;
        // SAFETY: writing plain integers into the union member we then read.
        unsafe {
            run.__bindgen_anon_1.emulation_failure.suberror = KVM_INTERNAL_ERROR_EMULATION;
            run.__bindgen_anon_1.emulation_failure.ndata = 3;
            run.__bindgen_anon_1.emulation_failure.flags = 1;
            let b = &mut run.__bindgen_anon_1.emulation_failure.__bindgen_anon_1.__bindgen_anon_1;
            b.insn_size = 3;
            b.insn_bytes[..3].copy_from_slice(&[0x0f, 0x01, 0xca]);
        }
        let e = internal_error(&run).unwrap();
        assert_eq!(e.suberror, 1);
        assert_eq!(e.insn, Some(vec![0x0f, 0x01, 0xca]));
        assert_eq!(e.data.len(), 3);
        assert_eq!(isla_insn::hex(&[0x0f, 0x01, 0xca]), "0f 01 ca");
        assert_eq!(suberror_name(2), "KVM_INTERNAL_ERROR_SIMUL_EX");
    }

    #[test]
    fn oversized_lengths_are_clamped() {
        // SAFETY: as above.
        let mut run: kvm_run = unsafe { std::mem::zeroed() };
        run.exit_reason = KVM_EXIT_INTERNAL_ERROR;
        run.__bindgen_anon_1.emulation_failure.suberror = KVM_INTERNAL_ERROR_EMULATION;
        run.__bindgen_anon_1.emulation_failure.ndata = 1000;
        run.__bindgen_anon_1.emulation_failure.flags = 1;
        run.__bindgen_anon_1.emulation_failure.__bindgen_anon_1.__bindgen_anon_1.insn_size = 200;
        let e = internal_error(&run).unwrap();
        assert_eq!(e.insn.unwrap().len(), 15);
        assert_eq!(e.data.len(), 16);
    }
}
