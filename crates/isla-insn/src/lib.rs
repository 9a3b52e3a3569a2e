//! Instruction fallback for emulation failures (see docs).
