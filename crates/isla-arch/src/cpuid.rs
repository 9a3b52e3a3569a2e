//! CPUID templates (placeholder: being written).
