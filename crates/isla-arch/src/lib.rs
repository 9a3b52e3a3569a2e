//! x86-64 machine definition of an isla microVM, with no KVM file descriptors in it: the memory
//! map and port assignments ([`layout`]), the long-mode boot state written into guest memory
//! ([`boot`]: GDT, identity page tables, boot_params and the e820 map), the ACPI tables that
//! describe CPUs and devices ([`acpi`]) and CPUID normalisation with CPU templates ([`cpuid`]).
//! Everything here is plain data and guest-memory writes, so it is unit-tested without a guest.

pub mod acpi;
pub mod boot;
pub mod cpuid;
pub mod layout;
