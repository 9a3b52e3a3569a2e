//! Long-mode boot state of the boot vCPU, written into guest memory and vCPU registers.
//!
//! isla always enters the kernel through the 64-bit boot protocol (Documentation/x86/boot.rst,
//! "64-bit BOOT PROTOCOL"): the monitor builds a flat GDT, an identity map of the first 4 GiB with
//! 2 MiB pages, turns on paging and long mode, points RSI at `boot_params` and jumps to the 64-bit
//! entry. The real-mode setup code of a bzImage never runs (it is slow to emulate and needs a BIOS).

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::layout::*;

/// Errors while writing the boot state.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// A fixed boot structure does not fit in guest memory.
    #[error("cannot write the {what} at {addr:#x} into guest memory (is the guest smaller than 1 MiB?)")]
    Write { what: &'static str, addr: u64 },
    /// The initrd does not fit where the kernel can reach it.
    #[error("the initrd ({size} bytes) does not fit in guest RAM between the kernel end {kernel_end:#x} and {limit:#x}: give the guest more memory or use a smaller initrd")]
    InitrdTooLarge { size: u64, kernel_end: u64, limit: u64 },
    /// Too many e820 entries.
    #[error("too many e820 entries ({0})")]
    E820Full(usize),
}

// CR0, CR4 and EFER bits.
const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_NE: u64 = 1 << 5;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// E820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// E820 type of reserved memory.
pub const E820_RESERVED: u32 = 2;

/// The boot GDT: null, 64-bit code, data, TSS (selectors 0x08, 0x10, 0x18).
pub fn gdt_table() -> [u64; 4] {
    [
        gdt_entry(0, 0, 0),
        gdt_entry(0xa09b, 0, 0xfffff), // code: present, ring 0, exec/read, accessed, L=1, G=1
        gdt_entry(0xc093, 0, 0xfffff), // data: present, ring 0, read/write, accessed, D/B=1, G=1
        gdt_entry(0x808b, 0, 0xfffff), // TSS: present, busy 64-bit TSS, G=1
    ]
}

/// Encodes a segment descriptor from its flags (type/S/DPL/P in bits 0-7, AVL/L/DB/G in 12-15),
/// base and limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The KVM segment register that a selector of GDT entry `index` loads.
pub fn segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let base = ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000);
    let limit_raw = (entry & 0xffff) | ((entry >> 32) & 0xf_0000);
    let g = ((entry >> 55) & 1) as u8;
    // With G=1 the limit counts 4 KiB pages.
    let limit = if g == 1 { (limit_raw << 12) | 0xfff } else { limit_raw };
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base,
        limit: limit as u32,
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        padding: 0,
        unusable: u8::from(present == 0),
    }
}

fn write<M: GuestMemoryBackend, T: vm_memory::ByteValued>(
    mem: &M,
    what: &'static str,
    addr: u64,
    val: T,
) -> Result<(), BootError> {
    mem.write_obj(val, GuestAddress(addr)).map_err(|_| BootError::Write { what, addr })
}

/// Writes the GDT and an empty IDT, and the identity page tables (4 GiB, 2 MiB pages).
pub fn write_boot_tables<M: GuestMemoryBackend>(mem: &M) -> Result<(), BootError> {
    for (i, e) in gdt_table().iter().enumerate() {
        write(mem, "GDT", BOOT_GDT_START + 8 * i as u64, *e)?;
    }
    write(mem, "IDT", BOOT_IDT_START, 0u64)?;
    // PML4[0] -> PDPT; PDPT[0..4] -> four page directories; each PDE maps 2 MiB (PS bit).
    write(mem, "PML4", PML4_START, PDPTE_START | 0x03)?;
    let dirs = IDENTITY_MAPPED >> 30;
    for d in 0..dirs {
        let pd = PDE_START + d * 0x1000;
        write(mem, "PDPT", PDPTE_START + d * 8, pd | 0x03)?;
        for i in 0..512u64 {
            let phys = ((d << 9) + i) << 21;
            write(mem, "page directory", pd + i * 8, phys | 0x83)?;
        }
    }
    Ok(())
}

/// Sets the special registers of the boot vCPU for long mode with the boot GDT and page tables.
pub fn long_mode_sregs(sregs: &mut kvm_sregs) {
    let gdt = gdt_table();
    let code = segment_from_gdt(gdt[1], 1);
    let data = segment_from_gdt(gdt[2], 2);
    let tss = segment_from_gdt(gdt[3], 3);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&gdt) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_NE | X86_CR0_PG;
    sregs.cr3 = PML4_START;
    sregs.cr4 = X86_CR4_PAE;
    sregs.efer = EFER_LME | EFER_LMA;
}

/// General registers of the boot vCPU: entry point, stack, and RSI = boot_params.
pub fn boot_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START,
        ..Default::default()
    }
}

/// FPU state at reset: x87 control word 0x37f, MXCSR 0x1f80.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() }
}

/// Model-specific registers set on every vCPU before boot: SYSENTER/SYSCALL entry points cleared
/// (the kernel programs them), TSC zeroed so all vCPUs start in step, fast strings on, MTRRs
/// enabled with write-back as the default type.
pub fn boot_msrs() -> Vec<(u32, u64)> {
    vec![
        (0x174, 0),             // IA32_SYSENTER_CS
        (0x175, 0),             // IA32_SYSENTER_ESP
        (0x176, 0),             // IA32_SYSENTER_EIP
        (0xc000_0081, 0),       // STAR
        (0xc000_0082, 0),       // LSTAR
        (0xc000_0083, 0),       // CSTAR
        (0xc000_0084, 0),       // SYSCALL_MASK
        (0xc000_0102, 0),       // KERNEL_GS_BASE
        (0x10, 0),              // IA32_TSC
        (0x1a0, 1),             // IA32_MISC_ENABLE: fast strings
        (0x2ff, (1 << 11) | 6), // MTRRdefType: enabled, write-back
    ]
}

/// Local APIC LVT registers programmed for virtual-wire mode: LINT0 delivers ExtINT (the PIC),
/// LINT1 delivers NMI. `regs` is the 1 KiB KVM_GET_LAPIC register page.
pub fn set_lapic_virtual_wire(regs: &mut [u8]) {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const MODE_EXTINT: u32 = 0x7;
    const MODE_NMI: u32 = 0x4;
    for (off, mode) in [(APIC_LVT0, MODE_EXTINT), (APIC_LVT1, MODE_NMI)] {
        if let Some(b) = regs.get_mut(off..off + 4) {
            let v = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            let v = (v & !0x700) | (mode << 8);
            b.copy_from_slice(&v.to_le_bytes());
        }
    }
}

/// What the zero page must tell the kernel.
#[derive(Debug, Clone, Default)]
pub struct BootParamsConfig {
    /// The bzImage's setup header (None for an ELF vmlinux).
    pub setup_header: Option<setup_header>,
    /// Length of the command line written at [`CMDLINE_START`], without the NUL.
    pub cmdline_len: usize,
    /// Initrd (address, size), if any.
    pub initrd: Option<(u64, u64)>,
    /// Guest RAM regions (start, length).
    pub ram: Vec<(u64, u64)>,
    /// Address of the ACPI RSDP.
    pub rsdp: Option<u64>,
    /// Address of the first setup_data node (see [`write_rng_seed`]).
    pub setup_data: Option<u64>,
}

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;

/// Builds boot_params: setup header, command line, initrd, e820 map and RSDP pointer.
pub fn build_boot_params(cfg: &BootParamsConfig) -> Result<boot_params, BootError> {
    let mut params = boot_params::default();
    if let Some(hdr) = cfg.setup_header {
        params.hdr = hdr;
    } else {
        params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
        params.hdr.header = KERNEL_HDR_MAGIC;
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cfg.cmdline_len as u32 + 1;
    if let Some((addr, size)) = cfg.initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    if let Some(rsdp) = cfg.rsdp {
        params.acpi_rsdp_addr = rsdp;
    }
    if let Some(sd) = cfg.setup_data {
        params.hdr.setup_data = sd;
    }
    let mut entries = vec![(0, EBDA_START, E820_RAM)];
    for &(start, len) in &cfg.ram {
        let start_hi = start.max(HIMEM_START);
        let end = start + len;
        if end > start_hi {
            entries.push((start_hi, end - start_hi, E820_RAM));
        }
    }
    if entries.len() > params.e820_table.len() {
        return Err(BootError::E820Full(entries.len()));
    }
    for (i, (addr, size, ty)) in entries.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry { addr: *addr, size: *size, r#type: *ty };
    }
    params.e820_entries = entries.len() as u8;
    Ok(params)
}

// The setup_data node lies between the boot page tables and the command line.
const _: () = assert!(SETUP_DATA_START >= PDE_START + 4 * 4096 && SETUP_DATA_START + 48 <= CMDLINE_START);

/// setup_data type of a random seed for the kernel's CRNG (arch/x86/include/uapi/asm/bootparam.h).
pub const SETUP_RNG_SEED: u32 = 9;

/// Writes a one-node setup_data list at [`SETUP_DATA_START`] carrying `seed` as SETUP_RNG_SEED, and
/// returns its address for [`BootParamsConfig::setup_data`].
///
/// Linux (5.20 and later, and 6.1) mixes the seed into its CRNG at the first step of boot and, when
/// it trusts the boot loader (`random.trust_bootloader`, on by default), credits it: with 32 bytes
/// the CRNG is ready at once, and the kernel does not spend its early boot gathering entropy from
/// interrupt timing, which is slow where the guest kernel runs under an emulator.
pub fn write_rng_seed<M: GuestMemoryBackend>(mem: &M, seed: &[u8; 32]) -> Result<u64, BootError> {
    // struct setup_data { u64 next; u32 type; u32 len; u8 data[]; }
    let mut node = Vec::with_capacity(16 + seed.len());
    node.extend_from_slice(&0u64.to_le_bytes());
    node.extend_from_slice(&SETUP_RNG_SEED.to_le_bytes());
    node.extend_from_slice(&(seed.len() as u32).to_le_bytes());
    node.extend_from_slice(seed);
    mem.write_slice(&node, GuestAddress(SETUP_DATA_START))
        .map_err(|_| BootError::Write { what: "setup_data", addr: SETUP_DATA_START })?;
    Ok(SETUP_DATA_START)
}

/// Writes boot_params at [`ZERO_PAGE_START`].
pub fn write_boot_params<M: GuestMemoryBackend>(mem: &M, params: &boot_params) -> Result<(), BootError> {
    write(mem, "boot_params", ZERO_PAGE_START, *params)
}

/// Where to put an initrd of `size` bytes: page-aligned, as high as possible in low RAM, below
/// `addr_max` (the header's initrd_addr_max) and above `kernel_end`.
pub fn initrd_address(low_ram_end: u64, size: u64, addr_max: u64, kernel_end: u64) -> Result<u64, BootError> {
    let limit = low_ram_end.min(addr_max.saturating_add(1));
    let err = BootError::InitrdTooLarge { size, kernel_end, limit };
    let start = limit.checked_sub(size).ok_or(err)? & !0xfff;
    if start < kernel_end {
        return Err(BootError::InitrdTooLarge { size, kernel_end, limit });
    }
    Ok(start)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn mem(size: u64) -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size as usize)]).unwrap()
    }

    #[test]
    fn gdt_entries_decode_to_flat_long_mode_segments() {
        let gdt = gdt_table();
        assert_eq!(gdt[0], 0);
        assert_eq!(gdt[1], 0x00af_9b00_0000_ffff);
        assert_eq!(gdt[2], 0x00cf_9300_0000_ffff);
        let cs = segment_from_gdt(gdt[1], 1);
        assert_eq!((cs.selector, cs.l, cs.db, cs.present, cs.type_, cs.s), (8, 1, 0, 1, 0xb, 1));
        assert_eq!((cs.base, cs.limit, cs.g), (0, 0xffff_ffff, 1));
        let ds = segment_from_gdt(gdt[2], 2);
        assert_eq!((ds.selector, ds.l, ds.db, ds.type_), (0x10, 0, 1, 3));
        let tr = segment_from_gdt(gdt[3], 3);
        assert_eq!((tr.selector, tr.type_, tr.s), (0x18, 0xb, 0));
        assert_eq!(segment_from_gdt(0, 0).unusable, 1);
    }

    #[test]
    fn page_tables_identity_map_four_gib() {
        let m = mem(1 << 20);
        write_boot_tables(&m).unwrap();
        let pml4: u64 = m.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4, PDPTE_START | 3);
        // Walk a few addresses: virtual == physical.
        for va in [0u64, 0x100_0000, 0x7fe0_0000, 0xc000_0000, 0xffe0_0000] {
            let pdpte: u64 = m.read_obj(GuestAddress(PDPTE_START + ((va >> 30) & 511) * 8)).unwrap();
            let pde: u64 = m.read_obj(GuestAddress((pdpte & !0xfff) + ((va >> 21) & 511) * 8)).unwrap();
            assert_eq!(pde & 0x83, 0x83, "present, writable, 2 MiB page");
            assert_eq!(pde & !0x1f_ffff, va);
        }
        let gdt1: u64 = m.read_obj(GuestAddress(BOOT_GDT_START + 8)).unwrap();
        assert_eq!(gdt1, gdt_table()[1]);
    }

    #[test]
    fn boot_tables_need_the_first_megabyte() {
        let m = mem(0x4000);
        assert!(matches!(write_boot_tables(&m), Err(BootError::Write { what: "PML4", .. })));
    }

    #[test]
    fn lapic_virtual_wire() {
        let mut regs = vec![0u8; 1024];
        regs[0x350..0x354].copy_from_slice(&0x0001_0700u32.to_le_bytes());
        set_lapic_virtual_wire(&mut regs);
        assert_eq!(u32::from_le_bytes(regs[0x350..0x354].try_into().unwrap()), 0x0001_0700);
        assert_eq!(u32::from_le_bytes(regs[0x360..0x364].try_into().unwrap()), 0x400);
        set_lapic_virtual_wire(&mut [0u8; 16]);
        assert!(boot_msrs().iter().any(|&(m, v)| m == 0x1a0 && v == 1));
    }

    #[test]
    fn long_mode_state() {
        let mut s = kvm_sregs::default();
        long_mode_sregs(&mut s);
        assert_eq!(s.cr0 & (X86_CR0_PE | X86_CR0_PG), X86_CR0_PE | X86_CR0_PG);
        assert_eq!(s.cr4 & X86_CR4_PAE, X86_CR4_PAE);
        assert_eq!(s.efer, EFER_LME | EFER_LMA);
        assert_eq!(s.cr3, PML4_START);
        assert_eq!(s.cs.l, 1);
        assert_eq!(s.gdt.limit, 31);
        let r = boot_regs(0x100_0000);
        assert_eq!((r.rip, r.rsi, r.rsp, r.rflags), (0x100_0000, ZERO_PAGE_START, BOOT_STACK_POINTER, 2));
    }

    #[test]
    fn boot_params_for_elf_and_bzimage() {
        let cfg = BootParamsConfig {
            setup_header: None,
            cmdline_len: 20,
            initrd: Some((0x700_0000, 0x1234)),
            ram: vec![(0, 128 << 20)],
            rsdp: Some(ACPI_START),
            setup_data: Some(SETUP_DATA_START),
        };
        let p = build_boot_params(&cfg).unwrap();
        assert_eq!({ p.hdr.setup_data }, SETUP_DATA_START);
        assert_eq!({ p.hdr.boot_flag }, 0xaa55);
        assert_eq!({ p.hdr.header }, 0x5372_6448);
        assert_eq!({ p.hdr.type_of_loader }, 0xff);
        assert_eq!({ p.hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ p.hdr.cmdline_size }, 21);
        assert_eq!(({ p.hdr.ramdisk_image }, { p.hdr.ramdisk_size }), (0x700_0000, 0x1234));
        assert_eq!({ p.acpi_rsdp_addr }, ACPI_START);
        assert_eq!(p.e820_entries, 2);
        let e = p.e820_table;
        assert_eq!(({ e[0].addr }, { e[0].size }, { e[0].r#type }), (0, EBDA_START, E820_RAM));
        assert_eq!(({ e[1].addr }, { e[1].size }), (HIMEM_START, (128 << 20) - HIMEM_START));

        let hdr = setup_header { setup_sects: 27, version: 0x20f, loadflags: 1, ..Default::default() };
        let p = build_boot_params(&BootParamsConfig { setup_header: Some(hdr), ..cfg }).unwrap();
        assert_eq!(({ p.hdr.setup_sects }, { p.hdr.version }, { p.hdr.type_of_loader }), (27, 0x20f, 0xff));
    }

    #[test]
    fn boot_params_cover_memory_above_the_gap() {
        let cfg = BootParamsConfig { ram: ram_regions(5 << 30), ..Default::default() };
        let p = build_boot_params(&cfg).unwrap();
        assert_eq!(p.e820_entries, 3);
        let e = p.e820_table;
        assert_eq!(({ e[1].addr }, { e[1].size }), (HIMEM_START, MMIO_GAP_START - HIMEM_START));
        assert_eq!(({ e[2].addr }, { e[2].size }), (MMIO_GAP_END, (5 << 30) - MMIO_GAP_START));
    }

    #[test]
    fn rng_seed_is_one_setup_data_node() {
        let mem = vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let seed = [0x5a; 32];
        assert_eq!(write_rng_seed(&mem, &seed).unwrap(), SETUP_DATA_START);
        let mut node = [0u8; 48];
        mem.read_slice(&mut node, GuestAddress(SETUP_DATA_START)).unwrap();
        assert_eq!(&node[0..8], &[0; 8], "last node: next is 0");
        assert_eq!(u32::from_le_bytes(node[8..12].try_into().unwrap()), SETUP_RNG_SEED);
        assert_eq!(u32::from_le_bytes(node[12..16].try_into().unwrap()), 32);
        assert_eq!(&node[16..], &seed);
    }

    #[test]
    fn initrd_goes_high_and_must_fit() {
        let a = initrd_address(128 << 20, 0x1800, 0x37ff_ffff, 0x200_0000).unwrap();
        assert_eq!(a, (128 << 20) - 0x2000);
        assert_eq!(a % 4096, 0);
        let a = initrd_address(2 << 30, 0x1000, 0x37ff_ffff, 0x200_0000).unwrap();
        assert_eq!(a, 0x3800_0000 - 0x1000);
        assert!(matches!(
            initrd_address(32 << 20, 31 << 20, 0x37ff_ffff, 0x200_0000),
            Err(BootError::InitrdTooLarge { .. })
        ));
        assert!(initrd_address(1 << 20, 4 << 20, 0x37ff_ffff, 0).is_err());
    }
}
