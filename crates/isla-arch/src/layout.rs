//! Guest physical memory map and port assignments of an isla microVM (x86-64).
//!
//! ```text
//! 0x0000_0500  GDT (4 entries), IDT (empty) at 0x520
//! 0x0000_7000  boot_params ("zero page")
//! 0x0000_8ff0  initial stack pointer
//! 0x0000_9000  PML4, 0xa000 PDPT, 0xb000..0xf000 four page directories (identity map of 4 GiB, 2 MiB pages)
//! 0x0002_0000  kernel command line
//! 0x0009_fc00  EBDA start (RAM below it is usable)
//! 0x000e_0000  ACPI tables (RSDP first, scanned by the kernel in 0xe0000..0x100000)
//! 0x0010_0000  kernel (bzImage protected-mode part, or ELF segments at their physical address)
//! ...          RAM up to min(size, 3 GiB); then the 32-bit MMIO gap; RAM resumes at 4 GiB
//! 0xc000_0000  virtio-mmio device windows (4 KiB each)
//! 0xd000_0000  boot-timer marker (a guest write here is timed by the VMM)
//! 0xfec0_0000  IOAPIC, 0xfee0_0000 local APIC
//! ```

/// GDT location.
pub const BOOT_GDT_START: u64 = 0x500;
/// IDT location (an empty IDT: the kernel installs its own before enabling interrupts).
pub const BOOT_IDT_START: u64 = 0x520;
/// The Linux boot_params structure.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer (and frame pointer) of the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Page-map level 4 table.
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// First of four page directories (2 MiB pages covering 4 GiB).
pub const PDE_START: u64 = 0xb000;
/// How much the boot page tables identity-map.
pub const IDENTITY_MAPPED: u64 = 4 << 30;
/// The boot_params setup_data list: a random seed for the guest kernel's CRNG (SETUP_RNG_SEED).
pub const SETUP_DATA_START: u64 = 0x1f000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest command line accepted (including the terminating NUL); Linux x86 reads at most 2048.
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the Extended BIOS Data Area: RAM below this is usable.
pub const EBDA_START: u64 = 0x9fc00;
/// Where the ACPI tables go (RSDP first).
pub const ACPI_START: u64 = 0xe0000;
/// End of the ACPI window (exclusive).
pub const ACPI_END: u64 = 0x100000;
/// Start of high memory: the kernel is loaded here.
pub const HIMEM_START: u64 = 0x100000;
/// 32-bit MMIO gap (no RAM here).
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO gap.
pub const MMIO_GAP_END: u64 = 1 << 32;
/// First virtio-mmio device window.
pub const VIRTIO_MMIO_START: u64 = MMIO_GAP_START;
/// Size of one virtio-mmio window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// First GSI handed to virtio-mmio devices (0..4 are legacy ISA: PIT, keyboard, cascade, COM2, COM1).
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// Last GSI usable for devices (IOAPIC has 24 pins).
pub const IRQ_MAX: u32 = 23;
/// Boot-time marker: a guest write of [`BOOT_TIMER_MAGIC`] here is timed (as Firecracker's boot timer).
pub const BOOT_TIMER_ADDR: u64 = 0xd000_0000;
/// Value the guest writes to the boot-timer address.
pub const BOOT_TIMER_MAGIC: u8 = 123;
/// IOAPIC MMIO address.
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
/// Local APIC MMIO address.
pub const APIC_ADDR: u64 = 0xfee0_0000;
/// TSS address handed to KVM_SET_TSS_ADDR (three pages, inside the gap).
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;

/// First serial port (COM1) and its IRQ.
pub const COM1_PORT: u16 = 0x3f8;
/// IRQ of COM1.
pub const COM1_IRQ: u32 = 4;
/// i8042 data and command ports.
pub const I8042_DATA_PORT: u16 = 0x60;
/// i8042 status/command port (a write of 0xfe resets the machine).
pub const I8042_COMMAND_PORT: u16 = 0x64;
/// ACPI hardware-reduced sleep control register (FADT SLEEP_CONTROL_REG).
pub const ACPI_SLEEP_CONTROL_PORT: u16 = 0x600;
/// ACPI hardware-reduced sleep status register (FADT SLEEP_STATUS_REG).
pub const ACPI_SLEEP_STATUS_PORT: u16 = 0x601;
/// ACPI reset register (FADT RESET_REG).
pub const ACPI_RESET_PORT: u16 = 0x602;
/// Value written to the reset register to reboot.
pub const ACPI_RESET_VALUE: u8 = 0x1;
/// Sleep type of S5 (soft off) as given in the DSDT `_S5_` object.
pub const ACPI_S5_SLEEP_TYPE: u8 = 5;

/// RAM regions (guest physical start, length) for a guest of `mem_size` bytes:
/// one region below the MMIO gap and, for larger guests, one above 4 GiB.
pub fn ram_regions(mem_size: u64) -> Vec<(u64, u64)> {
    let low = mem_size.min(MMIO_GAP_START);
    let mut regions = vec![(0, low)];
    if mem_size > low {
        regions.push((MMIO_GAP_END, mem_size - low));
    }
    regions
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_is_one_region() {
        assert_eq!(ram_regions(128 << 20), vec![(0, 128 << 20)]);
    }

    #[test]
    fn large_guest_skips_the_gap() {
        let r = ram_regions(4 << 30);
        assert_eq!(r, vec![(0, MMIO_GAP_START), (MMIO_GAP_END, (4 << 30) - MMIO_GAP_START)]);
        assert_eq!(r.iter().map(|x| x.1).sum::<u64>(), 4 << 30);
    }

    // Checked when the crate compiles.
    const _: () = {
        assert!(BOOT_IDT_START >= BOOT_GDT_START + 4 * 8);
        assert!(ZERO_PAGE_START + 4096 <= BOOT_STACK_POINTER);
        assert!(BOOT_STACK_POINTER < PML4_START);
        assert!(PDE_START + 4 * 4096 <= CMDLINE_START);
        assert!(CMDLINE_START + CMDLINE_MAX_SIZE as u64 <= EBDA_START);
        assert!(ACPI_END <= HIMEM_START);
        assert!(BOOT_TIMER_ADDR > VIRTIO_MMIO_START && BOOT_TIMER_ADDR < IOAPIC_ADDR);
    };
}
