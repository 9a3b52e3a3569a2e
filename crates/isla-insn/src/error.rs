//! The error type of the fallback and the hex rendering of instruction bytes used in its messages.
//!
//! Every error that concerns an instruction carries its bytes as lowercase hex so that the
//! monitor's log line alone is enough to reproduce a failure with [`crate::decode`].

use std::fmt::Write as _;

use crate::decode::MAX_INSN_LEN;

/// Why an instruction was not (fully) handled.
///
/// An error means the vCPU state is unchanged by the instruction, except for
/// [`InsnError::Memory`] raised by a store (or by [`crate::Machine::set_fpu`]) in the middle of an
/// instruction with several effects: the instruction's earlier stores may then have landed.
#[derive(Debug, thiserror::Error)]
pub enum InsnError {
    /// The bytes decode to an instruction this crate does not execute, or to nothing it knows.
    #[error(
        "unsupported instruction {name} (bytes: {bytes})",
        name = .mnemonic.unwrap_or("(unrecognised opcode)")
    )]
    Unsupported {
        /// The mnemonic when the opcode was recognised.
        mnemonic: Option<&'static str>,
        /// The instruction bytes (at most 15) in hex.
        bytes: String,
    },
    /// The bytes end before the instruction does (prefixes, opcode, ModRM, SIB or displacement).
    #[error("truncated instruction (bytes: {bytes})")]
    Truncated {
        /// The bytes that were available, in hex.
        bytes: String,
    },
    /// The instruction would be longer than the architectural limit of 15 bytes.
    #[error("instruction longer than 15 bytes (bytes: {bytes})")]
    TooLong {
        /// The first 15 bytes, in hex.
        bytes: String,
    },
    /// A guest-virtual access failed (not mapped, outside guest memory, ...).
    #[error("guest memory access at {gva:#x} failed: {reason}")]
    Memory {
        /// The guest-virtual address of the access.
        gva: u64,
        /// What went wrong, from the [`crate::Machine`] implementation.
        reason: String,
    },
    /// Reading or writing the vCPU state failed.
    #[error("vCPU state access failed: {0}")]
    Vcpu(String),
}

impl InsnError {
    /// The mnemonic the error names, when it names one.
    pub fn mnemonic(&self) -> Option<&'static str> {
        match self {
            InsnError::Unsupported { mnemonic, .. } => *mnemonic,
            _ => None,
        }
    }

    pub(crate) fn unsupported(mnemonic: Option<&'static str>, bytes: &[u8]) -> Self {
        InsnError::Unsupported { mnemonic, bytes: hex(window(bytes)) }
    }

    pub(crate) fn truncated(bytes: &[u8]) -> Self {
        InsnError::Truncated { bytes: hex(window(bytes)) }
    }

    pub(crate) fn too_long(bytes: &[u8]) -> Self {
        InsnError::TooLong { bytes: hex(window(bytes)) }
    }
}

/// The first [`MAX_INSN_LEN`] bytes, the most any instruction can use.
fn window(bytes: &[u8]) -> &[u8] {
    bytes.get(..MAX_INSN_LEN).unwrap_or(bytes)
}

/// Renders bytes as lowercase hex pairs separated by single spaces (`"f3 48 0f b8 c3"`).
pub fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 3);
    for (i, b) in bytes.iter().enumerate() {
        if i > 0 {
            s.push(' ');
        }
        // Writing to a String cannot fail.
        let _ = write!(s, "{b:02x}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_formats_pairs() {
        assert_eq!(hex(&[]), "");
        assert_eq!(hex(&[0xf3, 0x48, 0x0f, 0xb8, 0xc3]), "f3 48 0f b8 c3");
    }

    #[test]
    fn errors_keep_at_most_fifteen_bytes() {
        let long = [0x66u8; 20];
        let e = InsnError::too_long(&long);
        let InsnError::TooLong { bytes } = &e else {
            panic!("wrong variant {e:?}");
        };
        assert_eq!(bytes.split(' ').count(), 15);
    }

    #[test]
    fn unsupported_message_names_mnemonic_and_bytes() {
        let e = InsnError::unsupported(Some("xsetbv"), &[0x0f, 0x01, 0xd1]);
        assert_eq!(e.to_string(), "unsupported instruction xsetbv (bytes: 0f 01 d1)");
        assert_eq!(e.mnemonic(), Some("xsetbv"));
        let e = InsnError::unsupported(None, &[0x0f, 0xff]);
        assert_eq!(e.to_string(), "unsupported instruction (unrecognised opcode) (bytes: 0f ff)");
    }
}
