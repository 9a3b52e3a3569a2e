//! ACPI tables of an isla microVM: the only firmware-like description the guest kernel gets.
//!
//! The guest is an x86-64 machine with KVM's in-kernel local APICs and IOAPIC, no PCI and a
//! *hardware-reduced* ACPI platform (no PM1 event/control blocks, no SCI, no GPEs). The tables are
//! written into `[layout::ACPI_START, layout::ACPI_END)`, in this order, each 16-byte aligned:
//!
//! * **RSDP** (revision 2) exactly at [`layout::ACPI_START`], where Linux finds it by scanning
//!   `0xe0000..0x100000`; it points at the XSDT.
//! * **XSDT** listing the FADT and the MADT.
//! * **FADT** (revision 6): `HW_REDUCED_ACPI` and `RESET_REG_SUP`; reset, sleep-control and
//!   sleep-status registers are 8-bit I/O ports from [`crate::layout`]; `X_DSDT` points at the DSDT;
//!   the IA-PC boot architecture flags say "no VGA" and "no CMOS RTC" (and, by leaving the 8042
//!   bit clear, "no i8042 to probe": the monitor's i8042 only serves the reset command).
//! * **MADT**: local APIC address, `PCAT_COMPAT`, one enabled local APIC per vCPU
//!   (processor UID = APIC ID = vCPU index), one IOAPIC (ID = `cpu_count`, GSI base 0), the
//!   interrupt source override ISA IRQ 0 -> GSI 2 (KVM wires the PIT to IOAPIC pin 2) and a local
//!   APIC NMI entry (LINT1 of all processors).
//! * **DSDT**: `\_S5_` (soft off, SLP_TYP = [`layout::ACPI_S5_SLEEP_TYPE`]: Linux's poweroff on a
//!   hardware-reduced platform writes `(SLP_TYP << 2) | SLP_EN` to the sleep-control port, which
//!   the monitor decodes), and under `\_SB_` the COM1 UART (`PNP0501`) and one `LNRO0005` device
//!   per virtio-mmio window, which is how Linux's `virtio_mmio` driver discovers devices via ACPI.
//!
//! Where `acpi_tables` 0.2 has no type for something (the MADT flags, the interrupt source
//! override and local APIC NMI structures), the bytes are laid out here at the offsets given by
//! the ACPI 6.5 specification and wrapped in the crate's generic [`Sdt`] table, which keeps the
//! length and checksum right.

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{EnabledStatus, IoApic, ProcessorLocalApic};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryError};

use crate::layout;

/// Largest number of vCPUs described in the MADT.
pub const MAX_CPUS: u8 = 32;

/// Largest number of virtio-mmio devices: one exclusive GSI each, from
/// [`layout::VIRTIO_IRQ_BASE`] to [`layout::IRQ_MAX`].
pub const MAX_VIRTIO_DEVICES: usize = (layout::IRQ_MAX - layout::VIRTIO_IRQ_BASE + 1) as usize;

/// OEM ID written into every table header.
pub const OEM_ID: [u8; 6] = *b"ISLAVM";
/// OEM table ID written into every table header.
pub const OEM_TABLE_ID: [u8; 8] = *b"ISLA    ";
/// OEM revision written into every table header.
pub const OEM_REVISION: u32 = 1;

/// Alignment of every table inside the ACPI window.
const TABLE_ALIGN: u64 = 16;

/// FADT `IAPC_BOOT_ARCH` bit 2: VGA not present.
const IAPC_BOOT_ARCH_VGA_NOT_PRESENT: u16 = 1 << 2;
/// FADT `IAPC_BOOT_ARCH` bit 5: CMOS RTC not present.
const IAPC_BOOT_ARCH_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;

/// DSDT revision: 2 and above means 64-bit AML integers.
const DSDT_REVISION: u8 = 2;
/// MADT revision of ACPI 6.2 to 6.4 (the structures used here are unchanged since revision 1).
const MADT_REVISION: u8 = 5;
/// Offset of "Local Interrupt Controller Address" in the MADT.
const MADT_LAPIC_ADDR_OFFSET: usize = 36;
/// Offset of the MADT flags.
const MADT_FLAGS_OFFSET: usize = 40;
/// MADT flags bit 0: the system also has a dual-8259 PIC (KVM's in-kernel PIC).
const MADT_PCAT_COMPAT: u32 = 1;
/// Size of the MADT header (standard header, local APIC address, flags).
const MADT_HEADER_LEN: u32 = 44;
/// Size of a standard ACPI table header.
const SDT_HEADER_LEN: u32 = 36;
/// MADT structure type 2: Interrupt Source Override.
const MADT_TYPE_ISO: u8 = 2;
/// MADT structure type 4: Local APIC NMI.
const MADT_TYPE_LAPIC_NMI: u8 = 4;
/// "All processors" as a processor UID of a Local APIC NMI structure.
const ALL_PROCESSORS: u8 = 0xff;

// The MADT holds 32-bit interrupt controller addresses and virtio device names have three hex
// digits: both are checked when compiling, so the casts below never truncate.
const _: () = assert!(layout::APIC_ADDR <= u32::MAX as u64);
const _: () = assert!(layout::IOAPIC_ADDR <= u32::MAX as u64);
const _: () = assert!(layout::BOOT_TIMER_ADDR <= u32::MAX as u64);
const _: () = assert!(MAX_VIRTIO_DEVICES <= 0x1000);
const APIC_ADDR_32: u32 = layout::APIC_ADDR as u32;
const IOAPIC_ADDR_32: u32 = layout::IOAPIC_ADDR as u32;

/// One virtio-mmio device window to describe in the DSDT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioDevice {
    /// Guest physical base of the register window.
    pub base: u64,
    /// Length of the window in bytes.
    pub len: u64,
    /// GSI (IOAPIC pin) of the device, edge-triggered, active high, not shared.
    pub irq: u32,
}

/// What the ACPI tables describe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcpiConfig {
    /// Number of vCPUs, 1..=[`MAX_CPUS`]; APIC IDs are `0..cpu_count`.
    pub cpu_count: u8,
    /// virtio-mmio devices, at most [`MAX_VIRTIO_DEVICES`]; entry `i` gets `_UID` `i`.
    pub virtio_mmio: Vec<MmioDevice>,
}

/// Why the ACPI tables could not be built or written.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// The vCPU count is outside 1..=[`MAX_CPUS`].
    #[error("invalid vCPU count {0}: the MADT describes 1 to {MAX_CPUS} vCPUs")]
    InvalidCpuCount(u8),
    /// More virtio-mmio devices than there are device GSIs.
    #[error("{count} virtio-mmio devices requested, at most {MAX_VIRTIO_DEVICES} fit (one GSI each)")]
    TooManyDevices {
        /// Number of devices requested.
        count: usize,
    },
    /// A device window is empty or lies outside the virtio-mmio area of the layout.
    #[error(
        "virtio-mmio device {index}: window {base:#x} (+{len:#x}) is empty or outside \
         [{:#x}, {:#x})",
        layout::VIRTIO_MMIO_START,
        layout::BOOT_TIMER_ADDR
    )]
    DeviceWindow {
        /// Index of the device in [`AcpiConfig::virtio_mmio`].
        index: usize,
        /// Base address given.
        base: u64,
        /// Length given.
        len: u64,
    },
    /// Two device windows overlap.
    #[error("virtio-mmio devices {first} and {second} have overlapping windows")]
    DeviceOverlap {
        /// Index of the first device.
        first: usize,
        /// Index of the second device.
        second: usize,
    },
    /// A device IRQ is not one of the device GSIs.
    #[error(
        "virtio-mmio device {index}: IRQ {irq} is outside the device GSIs {}..={}",
        layout::VIRTIO_IRQ_BASE,
        layout::IRQ_MAX
    )]
    DeviceIrq {
        /// Index of the device.
        index: usize,
        /// IRQ given.
        irq: u32,
    },
    /// Two devices were given the same (exclusive) IRQ.
    #[error("virtio-mmio devices {first} and {second} share IRQ {irq}, which is exclusive")]
    DuplicateIrq {
        /// Index of the first device.
        first: usize,
        /// Index of the second device.
        second: usize,
        /// The shared IRQ.
        irq: u32,
    },
    /// The tables do not fit in the ACPI window.
    #[error(
        "ACPI tables need {size:#x} bytes and would end at {end:#x}, {} bytes past the end of the \
         ACPI window ({:#x})",
        end.saturating_sub(layout::ACPI_END),
        layout::ACPI_END
    )]
    TablesTooLarge {
        /// Total size of the tables including alignment padding.
        size: u64,
        /// Address just past the last table.
        end: u64,
    },
    /// Writing a table into guest memory failed.
    #[error("cannot write the {table} at {addr:#x} into guest memory: {source}")]
    GuestMemory {
        /// Signature of the table.
        table: &'static str,
        /// Guest physical address of the table.
        addr: u64,
        /// The guest memory error.
        source: GuestMemoryError,
    },
}

/// Guest physical addresses of the tables, computed before any of them is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Placement {
    rsdp: u64,
    xsdt: u64,
    fadt: u64,
    madt: u64,
    dsdt: u64,
    end: u64,
}

/// Writes RSDP, XSDT, FADT, MADT and DSDT into guest memory in [layout::ACPI_START, layout::ACPI_END);
/// RSDP at ACPI_START exactly (16-byte aligned, Linux scans 0xe0000..0x100000 for it). Returns the RSDP address.
pub fn create_acpi_tables<M: GuestMemory>(mem: &M, cfg: &AcpiConfig) -> Result<u64, AcpiError> {
    validate(cfg)?;

    // The DSDT and MADT do not refer to other tables: build them first to know their sizes.
    let dsdt = build_dsdt(cfg)?;
    let madt = build_madt(cfg.cpu_count);
    let xsdt_len = u64::from(SDT_HEADER_LEN) + 2 * 8;
    let at = place(xsdt_len, len_u64(&madt), len_u64(&dsdt))?;

    let fadt = build_fadt(at.dsdt);
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(at.fadt);
    xsdt.add_entry(at.madt);
    let rsdp = Rsdp::new(OEM_ID, at.xsdt);

    write_table(mem, "RSDP", at.rsdp, &aml_bytes(&rsdp))?;
    write_table(mem, "XSDT", at.xsdt, &aml_bytes(&xsdt))?;
    write_table(mem, "FADT", at.fadt, &aml_bytes(&fadt))?;
    write_table(mem, "MADT", at.madt, &madt)?;
    write_table(mem, "DSDT", at.dsdt, &dsdt)?;
    Ok(at.rsdp)
}

/// Checks the configuration against the limits of the layout.
fn validate(cfg: &AcpiConfig) -> Result<(), AcpiError> {
    if cfg.cpu_count == 0 || cfg.cpu_count > MAX_CPUS {
        return Err(AcpiError::InvalidCpuCount(cfg.cpu_count));
    }
    let devices = &cfg.virtio_mmio;
    if devices.len() > MAX_VIRTIO_DEVICES {
        return Err(AcpiError::TooManyDevices { count: devices.len() });
    }
    for (index, dev) in devices.iter().enumerate() {
        let end = dev.base.checked_add(dev.len);
        let inside = dev.len > 0
            && dev.base >= layout::VIRTIO_MMIO_START
            && end.is_some_and(|end| end <= layout::BOOT_TIMER_ADDR);
        if !inside {
            return Err(AcpiError::DeviceWindow { index, base: dev.base, len: dev.len });
        }
        if !(layout::VIRTIO_IRQ_BASE..=layout::IRQ_MAX).contains(&dev.irq) {
            return Err(AcpiError::DeviceIrq { index, irq: dev.irq });
        }
    }
    for (second, b) in devices.iter().enumerate() {
        for (first, a) in devices.iter().enumerate().take(second) {
            // Both windows are non-empty and end below 4 GiB (checked above): no overflow.
            if a.base < b.base + b.len && b.base < a.base + a.len {
                return Err(AcpiError::DeviceOverlap { first, second });
            }
            if a.irq == b.irq {
                return Err(AcpiError::DuplicateIrq { first, second, irq: a.irq });
            }
        }
    }
    Ok(())
}

/// Lays the tables out after the RSDP, each aligned to [`TABLE_ALIGN`], and checks that they
/// end within the ACPI window.
fn place(xsdt_len: u64, madt_len: u64, dsdt_len: u64) -> Result<Placement, AcpiError> {
    let rsdp = layout::ACPI_START;
    let xsdt = align_up(rsdp + Rsdp::len() as u64);
    let fadt = align_up(xsdt + xsdt_len);
    let madt = align_up(fadt + acpi_tables::fadt::FADT::len() as u64);
    let dsdt = align_up(madt.saturating_add(madt_len));
    let end = dsdt.saturating_add(dsdt_len);
    if end > layout::ACPI_END {
        return Err(AcpiError::TablesTooLarge { size: end - rsdp, end });
    }
    Ok(Placement { rsdp, xsdt, fadt, madt, dsdt, end })
}

fn align_up(addr: u64) -> u64 {
    addr.saturating_add(TABLE_ALIGN - 1) & !(TABLE_ALIGN - 1)
}

fn len_u64(bytes: &[u8]) -> u64 {
    // usize is at most 64 bits on every supported target.
    bytes.len() as u64
}

/// Serialises any table or AML object.
fn aml_bytes(obj: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    obj.to_aml_bytes(&mut bytes);
    bytes
}

fn write_table<M: GuestMemory>(mem: &M, table: &'static str, addr: u64, bytes: &[u8]) -> Result<(), AcpiError> {
    mem.write_slice(bytes, GuestAddress(addr)).map_err(|source| AcpiError::GuestMemory { table, addr, source })
}

/// A GAS describing an 8-bit I/O port.
fn io_port_gas(port: u16) -> GAS {
    GAS::new(AddressSpace::SystemIo, 8, 0, AccessSize::ByteAccess, u64::from(port))
}

/// The FADT of a hardware-reduced platform.
fn build_fadt(dsdt_addr: u64) -> acpi_tables::fadt::FADT {
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup);
    fadt.reset_reg = io_port_gas(layout::ACPI_RESET_PORT);
    fadt.reset_value = layout::ACPI_RESET_VALUE;
    fadt.sleep_control_reg = io_port_gas(layout::ACPI_SLEEP_CONTROL_PORT);
    fadt.sleep_status_reg = io_port_gas(layout::ACPI_SLEEP_STATUS_PORT);
    fadt.iapc_boot_arch = (IAPC_BOOT_ARCH_VGA_NOT_PRESENT | IAPC_BOOT_ARCH_CMOS_RTC_NOT_PRESENT).into();
    fadt.finalize()
}

/// The MADT: local APICs, the IOAPIC, the PIT override and the LINT1 NMI.
fn build_madt(cpu_count: u8) -> Vec<u8> {
    let mut madt = Sdt::new(*b"APIC", MADT_HEADER_LEN, MADT_REVISION, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    madt.write_u32(MADT_LAPIC_ADDR_OFFSET, APIC_ADDR_32);
    madt.write_u32(MADT_FLAGS_OFFSET, MADT_PCAT_COMPAT);

    for cpu in 0..cpu_count {
        let lapic = ProcessorLocalApic::new(cpu, cpu, EnabledStatus::Enabled);
        madt.append_slice(&aml_bytes(&lapic));
    }
    madt.append_slice(&aml_bytes(&IoApic::new(cpu_count, IOAPIC_ADDR_32, 0)));

    // Interrupt Source Override: bus 0 (ISA), source IRQ 0, GSI 2, flags 0 (conforms to the bus:
    // edge, active high).
    let mut iso = vec![MADT_TYPE_ISO, 10, 0, 0];
    iso.extend_from_slice(&2u32.to_le_bytes());
    iso.extend_from_slice(&0u16.to_le_bytes());
    madt.append_slice(&iso);

    // Local APIC NMI: all processors, flags 0 (conforms), LINT1.
    let mut nmi = vec![MADT_TYPE_LAPIC_NMI, 6, ALL_PROCESSORS];
    nmi.extend_from_slice(&0u16.to_le_bytes());
    nmi.push(1);
    madt.append_slice(&nmi);

    madt.as_slice().to_vec()
}

/// The DSDT: `\_S5_`, COM1 and the virtio-mmio devices.
fn build_dsdt(cfg: &AcpiConfig) -> Result<Vec<u8>, AcpiError> {
    let mut body = Vec::new();

    // \_S5_: Package { SLP_TYPa, SLP_TYPb, reserved, reserved }.
    let slp_typ_a = layout::ACPI_S5_SLEEP_TYPE;
    let s5_package = aml::Package::new(vec![&slp_typ_a, &aml::ZERO, &aml::ZERO, &aml::ZERO]);
    aml::Name::new("\\_S5_".into(), &s5_package).to_aml_bytes(&mut body);

    let mut sb = com1_device();
    for (index, dev) in cfg.virtio_mmio.iter().enumerate() {
        sb.extend_from_slice(&virtio_device(index, dev)?);
    }
    body.extend_from_slice(&aml::Scope::raw("\\_SB_".into(), sb));

    let mut dsdt = Sdt::new(*b"DSDT", SDT_HEADER_LEN, DSDT_REVISION, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    dsdt.append_slice(&body);
    Ok(dsdt.as_slice().to_vec())
}

/// The 16550 UART at COM1.
fn com1_device() -> Vec<u8> {
    let hid = aml::EISAName::new("PNP0501");
    let uid: u32 = 0;
    let io = aml::IO::new(layout::COM1_PORT, layout::COM1_PORT, 1, 8);
    let irq = aml::Interrupt::new(true, true, false, false, layout::COM1_IRQ);
    let crs = aml::ResourceTemplate::new(vec![&io, &irq]);
    let hid_name = aml::Name::new("_HID".into(), &hid);
    let uid_name = aml::Name::new("_UID".into(), &uid);
    let crs_name = aml::Name::new("_CRS".into(), &crs);
    aml_bytes(&aml::Device::new("COM1".into(), vec![&hid_name, &uid_name, &crs_name]))
}

/// One `LNRO0005` device (`V000`, `V001`, ...) for a virtio-mmio window.
fn virtio_device(index: usize, dev: &MmioDevice) -> Result<Vec<u8>, AcpiError> {
    let window_error = || AcpiError::DeviceWindow { index, base: dev.base, len: dev.len };
    let base = u32::try_from(dev.base).map_err(|_| window_error())?;
    let len = u32::try_from(dev.len).map_err(|_| window_error())?;
    let uid = u32::try_from(index).map_err(|_| AcpiError::TooManyDevices { count: index })?;
    // Device names are four characters: 'V' and three hex digits. MAX_VIRTIO_DEVICES <= 0x1000
    // is checked in `validate`, so the name never grows past four characters.
    let name = format!("V{:03X}", uid & 0xfff);

    let hid: &'static str = "LNRO0005";
    let mem = aml::Memory32Fixed::new(true, base, len);
    let irq = aml::Interrupt::new(true, true, false, false, dev.irq);
    let crs = aml::ResourceTemplate::new(vec![&mem, &irq]);
    let hid_name = aml::Name::new("_HID".into(), &hid);
    let uid_name = aml::Name::new("_UID".into(), &uid);
    let crs_name = aml::Name::new("_CRS".into(), &crs);
    Ok(aml_bytes(&aml::Device::new(name.as_str().into(), vec![&hid_name, &uid_name, &crs_name])))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn memory() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 2 << 20)]).expect("guest memory")
    }

    fn devices(n: usize) -> Vec<MmioDevice> {
        (0..n)
            .map(|i| MmioDevice {
                base: layout::VIRTIO_MMIO_START + i as u64 * layout::VIRTIO_MMIO_SIZE,
                len: layout::VIRTIO_MMIO_SIZE,
                irq: layout::VIRTIO_IRQ_BASE + i as u32,
            })
            .collect()
    }

    fn config(cpu_count: u8, n_devices: usize) -> AcpiConfig {
        AcpiConfig { cpu_count, virtio_mmio: devices(n_devices) }
    }

    fn read(mem: &GuestMemoryMmap<()>, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        mem.read_slice(&mut buf, GuestAddress(addr)).expect("read guest memory");
        buf
    }

    fn u16_at(b: &[u8], off: usize) -> u16 {
        u16::from_le_bytes(b[off..off + 2].try_into().expect("2 bytes"))
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().expect("4 bytes"))
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().expect("8 bytes"))
    }

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |acc, x| acc.wrapping_add(*x))
    }

    /// Reads a whole table (header length) and checks that it is inside the window.
    fn table(mem: &GuestMemoryMmap<()>, addr: u64) -> Vec<u8> {
        let header = read(mem, addr, 36);
        let len = u32_at(&header, 4) as usize;
        assert!(len >= 36);
        assert!(addr >= layout::ACPI_START && addr + len as u64 <= layout::ACPI_END);
        read(mem, addr, len)
    }

    struct Tables {
        rsdp: Vec<u8>,
        xsdt: Vec<u8>,
        fadt: Vec<u8>,
        madt: Vec<u8>,
        dsdt: Vec<u8>,
    }

    /// Builds the tables and walks RSDP -> XSDT -> FADT/MADT -> DSDT.
    fn walk(cfg: &AcpiConfig) -> Tables {
        let mem = memory();
        let rsdp_addr = create_acpi_tables(&mem, cfg).expect("tables");
        assert_eq!(rsdp_addr, layout::ACPI_START);
        let rsdp = read(&mem, rsdp_addr, 36);
        let xsdt = table(&mem, u64_at(&rsdp, 24));
        assert_eq!(&xsdt[0..4], b"XSDT");
        let entries: Vec<u64> = (36..xsdt.len()).step_by(8).map(|o| u64_at(&xsdt, o)).collect();
        assert_eq!(entries.len(), 2);
        let fadt = table(&mem, entries[0]);
        let madt = table(&mem, entries[1]);
        let dsdt = table(&mem, u64_at(&fadt, 140));
        Tables { rsdp, xsdt, fadt, madt, dsdt }
    }

    fn count(haystack: &[u8], needle: &[u8]) -> usize {
        haystack.windows(needle.len()).filter(|w| *w == needle).count()
    }

    #[test]
    fn rsdp_is_at_acpi_start_with_valid_checksums() {
        let t = walk(&config(2, 1));
        assert_eq!(layout::ACPI_START % 16, 0);
        assert_eq!(&t.rsdp[0..8], b"RSD PTR ");
        assert_eq!(t.rsdp[15], 2, "revision");
        assert_eq!(u32_at(&t.rsdp, 20), 36, "length");
        assert_eq!(sum(&t.rsdp[0..20]), 0, "ACPI 1.0 checksum");
        assert_eq!(sum(&t.rsdp[0..36]), 0, "extended checksum");
    }

    #[test]
    fn xsdt_leads_to_every_table_with_valid_checksums() {
        for cpus in [1, 4, MAX_CPUS] {
            let t = walk(&config(cpus, 3));
            assert_eq!(&t.fadt[0..4], b"FACP");
            assert_eq!(&t.madt[0..4], b"APIC");
            assert_eq!(&t.dsdt[0..4], b"DSDT");
            for (name, bytes) in [("XSDT", &t.xsdt), ("FADT", &t.fadt), ("MADT", &t.madt), ("DSDT", &t.dsdt)] {
                assert_eq!(sum(bytes), 0, "{name} checksum");
                assert_eq!(&bytes[10..16], &OEM_ID, "{name} OEM ID");
            }
        }
    }

    #[test]
    fn fadt_is_hardware_reduced_with_reset_and_sleep_registers() {
        let t = walk(&config(1, 0));
        let f = &t.fadt;
        assert_eq!(f.len(), 276);
        assert_eq!(f[8], 6, "FADT major revision");
        let flags = u32_at(f, 112);
        assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
        assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
        let gas = |off: usize, port: u16| {
            assert_eq!(f[off], 1, "SystemIO at {off}");
            assert_eq!(f[off + 1], 8, "8 bits wide at {off}");
            assert_eq!(f[off + 2], 0, "bit offset at {off}");
            assert_eq!(f[off + 3], 1, "byte access at {off}");
            assert_eq!(u64_at(f, off + 4), u64::from(port), "port at {off}");
        };
        gas(116, layout::ACPI_RESET_PORT);
        assert_eq!(f[128], layout::ACPI_RESET_VALUE);
        gas(244, layout::ACPI_SLEEP_CONTROL_PORT);
        gas(256, layout::ACPI_SLEEP_STATUS_PORT);
        let boot_arch = u16_at(f, 109);
        assert_ne!(boot_arch & (1 << 2), 0, "VGA not present");
        assert_ne!(boot_arch & (1 << 5), 0, "CMOS RTC not present");
        assert_eq!(boot_arch & (1 << 1), 0, "no 8042 to probe");
        // No PM1 blocks or SCI on a hardware-reduced platform.
        assert_eq!(u32_at(f, 56), 0);
        assert_eq!(u32_at(f, 64), 0);
        assert_eq!(u16_at(f, 46), 0);
        assert_eq!(u32_at(f, 40), 0, "32-bit DSDT unused, X_DSDT set");
    }

    #[test]
    fn madt_describes_cpus_ioapic_and_overrides() {
        for cpus in [1u8, 2, 7, MAX_CPUS] {
            let t = walk(&config(cpus, 0));
            let m = &t.madt;
            assert_eq!(u64::from(u32_at(m, 36)), layout::APIC_ADDR);
            assert_eq!(u32_at(m, 40) & 1, 1, "PCAT_COMPAT");
            let mut lapics = Vec::new();
            let mut ioapics = Vec::new();
            let mut isos = Vec::new();
            let mut nmis = Vec::new();
            let mut off = 44;
            while off < m.len() {
                let (ty, len) = (m[off], m[off + 1] as usize);
                assert!(len >= 2 && off + len <= m.len(), "structure at {off}");
                let s = &m[off..off + len];
                match ty {
                    0 => {
                        assert_eq!(len, 8);
                        assert_eq!(u32_at(s, 4) & 1, 1, "enabled");
                        lapics.push((s[2], s[3]));
                    }
                    1 => {
                        assert_eq!(len, 12);
                        ioapics.push((s[2], u32_at(s, 4), u32_at(s, 8)));
                    }
                    2 => {
                        assert_eq!(len, 10);
                        isos.push((s[2], s[3], u32_at(s, 4), u16_at(s, 8)));
                    }
                    4 => {
                        assert_eq!(len, 6);
                        nmis.push((s[2], u16_at(s, 3), s[5]));
                    }
                    other => panic!("unexpected MADT structure type {other}"),
                }
                off += len;
            }
            assert_eq!(off, m.len());
            let expected: Vec<(u8, u8)> = (0..cpus).map(|i| (i, i)).collect();
            assert_eq!(lapics, expected, "uid = apic id = index");
            assert_eq!(ioapics, vec![(cpus, layout::IOAPIC_ADDR as u32, 0)]);
            assert_eq!(isos, vec![(0, 0, 2, 0)], "ISA IRQ 0 -> GSI 2");
            assert_eq!(nmis, vec![(0xff, 0, 1)], "LINT1 NMI on all CPUs");
        }
    }

    #[test]
    fn dsdt_has_s5_com1_and_one_device_per_virtio_window() {
        for n in [0usize, 1, 4, MAX_VIRTIO_DEVICES] {
            let cfg = config(2, n);
            let t = walk(&cfg);
            let d = &t.dsdt;
            assert_eq!(count(d, b"_S5_"), 1);
            // Name(\_S5_, Package(4) { BytePrefix SLP_TYP, 0, 0, 0 })
            let s5 = d.windows(4).position(|w| w == b"_S5_").expect("_S5_ present");
            assert_eq!(d[s5 - 1], b'\\');
            assert_eq!(d[s5 + 4], 0x12, "PackageOp");
            assert_eq!(d[s5 + 6], 4, "four elements");
            assert_eq!(&d[s5 + 7..s5 + 9], &[0x0a, layout::ACPI_S5_SLEEP_TYPE]);
            assert_eq!(&d[s5 + 9..s5 + 12], &[0, 0, 0]);

            assert_eq!(count(d, b"_SB_"), 1);
            // EISAID("PNP0501"): compressed "PNP" then 0x05 0x01, as a DWordConst.
            let pnp: u16 = (u16::from(b'P' - 0x40) << 10) | (u16::from(b'N' - 0x40) << 5) | u16::from(b'P' - 0x40);
            let eisa = [0x0c, (pnp >> 8) as u8, pnp as u8, 0x05, 0x01];
            assert_eq!(count(d, &eisa), 1, "PNP0501");
            // COM1: IO(Decode16, 0x3f8, 0x3f8, 1, 8) and an edge/high/exclusive interrupt 4.
            assert_eq!(count(d, &[0x47, 1, 0xf8, 0x03, 0xf8, 0x03, 1, 8]), 1);
            assert_eq!(count(d, &[0x89, 6, 0, 0x03, 1, 4, 0, 0, 0]), 1);

            assert_eq!(count(d, b"LNRO0005"), n);
            for (i, dev) in cfg.virtio_mmio.iter().enumerate() {
                let mut mem32 = vec![0x86, 9, 0, 1];
                mem32.extend_from_slice(&(dev.base as u32).to_le_bytes());
                mem32.extend_from_slice(&(dev.len as u32).to_le_bytes());
                assert_eq!(count(d, &mem32), 1, "Memory32Fixed of device {i}");
                let mut irq = vec![0x89, 6, 0, 0x03, 1];
                irq.extend_from_slice(&dev.irq.to_le_bytes());
                assert_eq!(count(d, &irq), 1, "interrupt of device {i}");
                assert_eq!(count(d, format!("V{i:03X}").as_bytes()), 1);
            }
        }
    }

    #[test]
    fn rejects_bad_cpu_counts() {
        let mem = memory();
        for cpus in [0u8, MAX_CPUS + 1, 255] {
            let err = create_acpi_tables(&mem, &config(cpus, 0)).expect_err("bad cpu count");
            assert!(matches!(err, AcpiError::InvalidCpuCount(c) if c == cpus), "{err}");
        }
    }

    #[test]
    fn rejects_too_many_devices() {
        let mut cfg = config(1, MAX_VIRTIO_DEVICES);
        cfg.virtio_mmio.push(MmioDevice {
            base: layout::VIRTIO_MMIO_START + 0x10_0000,
            len: layout::VIRTIO_MMIO_SIZE,
            irq: layout::IRQ_MAX,
        });
        let err = create_acpi_tables(&memory(), &cfg).expect_err("too many");
        assert!(matches!(err, AcpiError::TooManyDevices { count } if count == MAX_VIRTIO_DEVICES + 1));
    }

    #[test]
    fn rejects_bad_device_windows_and_irqs() {
        let mem = memory();
        let with = |dev: MmioDevice| AcpiConfig { cpu_count: 1, virtio_mmio: vec![dev] };
        let ok = devices(1)[0];
        for bad in [
            MmioDevice { len: 0, ..ok },
            MmioDevice { base: 0x1000, ..ok },
            MmioDevice { base: layout::BOOT_TIMER_ADDR, ..ok },
            MmioDevice { base: u64::MAX - 10, ..ok },
        ] {
            let err = create_acpi_tables(&mem, &with(bad)).expect_err("bad window");
            assert!(matches!(err, AcpiError::DeviceWindow { index: 0, .. }), "{err}");
        }
        for irq in [0, layout::COM1_IRQ, layout::IRQ_MAX + 1] {
            let err = create_acpi_tables(&mem, &with(MmioDevice { irq, ..ok })).expect_err("irq");
            assert!(matches!(err, AcpiError::DeviceIrq { index: 0, irq: i } if i == irq));
        }
        let mut overlap = config(1, 2);
        overlap.virtio_mmio[1].base = overlap.virtio_mmio[0].base + 0x800;
        let err = create_acpi_tables(&mem, &overlap).expect_err("overlap");
        assert!(matches!(err, AcpiError::DeviceOverlap { first: 0, second: 1 }));
        let mut shared = config(1, 3);
        shared.virtio_mmio[2].irq = shared.virtio_mmio[0].irq;
        let err = create_acpi_tables(&mem, &shared).expect_err("shared irq");
        assert!(matches!(err, AcpiError::DuplicateIrq { first: 0, second: 2, .. }));
    }

    #[test]
    fn overflowing_the_window_is_an_error_naming_the_overflow() {
        let ok = place(52, 100, 1000).expect("fits");
        assert_eq!(ok.rsdp, layout::ACPI_START);
        assert!(ok.xsdt >= ok.rsdp + 36 && ok.fadt >= ok.xsdt + 52);
        assert!(ok.madt >= ok.fadt + 276 && ok.dsdt >= ok.madt + 100);
        assert_eq!(ok.end, ok.dsdt + 1000);
        for a in [ok.xsdt, ok.fadt, ok.madt, ok.dsdt] {
            assert_eq!(a % TABLE_ALIGN, 0);
        }
        let err = place(52, 100, 0x20000).expect_err("too large");
        match &err {
            AcpiError::TablesTooLarge { end, .. } => assert!(*end > layout::ACPI_END),
            other => panic!("unexpected {other}"),
        }
        let msg = err.to_string();
        assert!(msg.contains("past the end of the ACPI window"), "{msg}");
        assert!(place(0, u64::MAX, 0).is_err());
    }

    #[test]
    fn guest_memory_without_the_acpi_window_is_an_error() {
        let small = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x8_0000)]).expect("memory");
        let err = create_acpi_tables(&small, &config(1, 0)).expect_err("no window");
        assert!(matches!(err, AcpiError::GuestMemory { table: "RSDP", .. }), "{err}");
    }
}
