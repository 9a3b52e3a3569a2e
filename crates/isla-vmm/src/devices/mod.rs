//! Devices of an isla microVM and the port-I/O and MMIO dispatch that the vCPU threads call.
//!
//! Legacy devices: a 16550 UART on COM1 (vm-superio), the i8042 reset line (vm-superio), the ACPI
//! hardware-reduced sleep/reset registers, and the boot-time marker. Unclaimed port reads return
//! all ones and unclaimed writes are dropped, as on a PC bus with nothing behind the address.

pub mod console;

use std::sync::{Arc, Mutex};

use isla_arch::layout::*;
use vm_superio::{I8042Device, Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::state::{GuestExit, VmShared};
use crate::virtio::VirtioDevices;
use crate::{host, lock};
use console::Console;

/// An interrupt line raised through a KVM irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// The i8042 reset line: ends the run as a reboot.
pub struct ResetTrigger(Arc<VmShared>);

impl Trigger for ResetTrigger {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.request_exit(GuestExit::Reboot { via: "i8042" });
        Ok(())
    }
}

/// The serial port type.
pub type SerialDevice = Serial<IrqTrigger, vm_superio::serial::NoEvents, Console>;

/// All devices of one VM.
pub struct Devices {
    /// COM1.
    pub serial: Mutex<SerialDevice>,
    i8042: Mutex<I8042Device<ResetTrigger>>,
    /// The virtio-mmio devices.
    pub virtio: VirtioDevices,
    shared: Arc<VmShared>,
}

/// Which device an exit went to (for the exit counters).
pub type Target = &'static str;

impl Devices {
    /// Creates the devices; `serial_irq` is registered by the caller as the irqfd of COM1's GSI.
    pub fn new(shared: Arc<VmShared>, serial_irq: EventFd, console: Console, virtio: VirtioDevices) -> Self {
        Devices {
            serial: Mutex::new(Serial::new(IrqTrigger(serial_irq), console)),
            i8042: Mutex::new(I8042Device::new(ResetTrigger(shared.clone()))),
            virtio,
            shared,
        }
    }

    /// Port read of `data.len()` bytes.
    pub fn pio_read(&self, port: u16, data: &mut [u8]) -> Target {
        data.fill(0xff);
        match port {
            COM1_PORT..=0x3ff => {
                if let Some(b) = data.first_mut() {
                    *b = lock(&self.serial).read((port - COM1_PORT) as u8);
                }
                "serial"
            }
            I8042_DATA_PORT | I8042_COMMAND_PORT => {
                if let Some(b) = data.first_mut() {
                    *b = lock(&self.i8042).read((port - I8042_DATA_PORT) as u8);
                }
                "i8042"
            }
            ACPI_SLEEP_CONTROL_PORT..=ACPI_RESET_PORT => {
                data.fill(0);
                "acpi"
            }
            _ => "unclaimed",
        }
    }

    /// Port write.
    pub fn pio_write(&self, port: u16, data: &[u8]) -> Target {
        let Some(&value) = data.first() else { return "unclaimed" };
        match port {
            COM1_PORT..=0x3ff => {
                if let Err(e) = lock(&self.serial).write((port - COM1_PORT) as u8, value) {
                    tracing::warn!("serial: {e:?}");
                }
                "serial"
            }
            I8042_DATA_PORT | I8042_COMMAND_PORT => {
                let _ = lock(&self.i8042).write((port - I8042_DATA_PORT) as u8, value);
                "i8042"
            }
            ACPI_SLEEP_CONTROL_PORT => {
                if let Some(exit) = acpi_sleep_request(value) {
                    self.shared.request_exit(exit);
                }
                "acpi"
            }
            ACPI_RESET_PORT => {
                if value == ACPI_RESET_VALUE {
                    self.shared.request_exit(GuestExit::Reboot { via: "acpi" });
                }
                "acpi"
            }
            ACPI_SLEEP_STATUS_PORT => "acpi",
            _ => "unclaimed",
        }
    }

    /// MMIO read.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) -> Target {
        data.fill(0xff);
        self.virtio.read(addr, data).unwrap_or("unclaimed")
    }

    /// MMIO write.
    pub fn mmio_write(&self, addr: u64, data: &[u8]) -> Target {
        if addr == BOOT_TIMER_ADDR {
            if data.first() == Some(&BOOT_TIMER_MAGIC) && self.shared.milestone("boot_marker", None) {
                self.shared.measure_memory("boot_marker");
                if let Some(start) = self.shared.boot_start_us() {
                    let now = host::now_us();
                    tracing::info!(
                        "guest boot-time marker: {:.1} ms after boot start, {:.1} ms after process start",
                        now.saturating_sub(start) as f64 / 1000.0,
                        now.saturating_sub(self.shared.process_start_us) as f64 / 1000.0
                    );
                }
            }
            return "boot-timer";
        }
        self.virtio.write(addr, data).unwrap_or("unclaimed")
    }
}

/// Decodes a write to the hardware-reduced ACPI sleep control register: SLP_EN (bit 5) with
/// SLP_TYP (bits 2-4) of S5 is a power-off request.
pub fn acpi_sleep_request(value: u8) -> Option<GuestExit> {
    let slp_en = value & (1 << 5) != 0;
    let slp_typ = (value >> 2) & 0x7;
    (slp_en && slp_typ == ACPI_S5_SLEEP_TYPE).then_some(GuestExit::Poweroff { via: "acpi" })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn devices() -> (Devices, Arc<VmShared>, EventFd) {
        let shared = Arc::new(VmShared::new(0));
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let console = Console::new(Box::new(std::io::sink()), shared.clone(), None);
        (Devices::new(shared.clone(), irq.try_clone().unwrap(), console, VirtioDevices::default()), shared, irq)
    }

    #[test]
    fn acpi_sleep_values() {
        assert_eq!(acpi_sleep_request((5 << 2) | 0x20), Some(GuestExit::Poweroff { via: "acpi" }));
        assert_eq!(acpi_sleep_request(5 << 2), None, "no SLP_EN");
        assert_eq!(acpi_sleep_request((3 << 2) | 0x20), None, "S3 is not power-off");
    }

    #[test]
    fn poweroff_and_reset_ports() {
        let (d, s, _) = devices();
        assert_eq!(d.pio_write(ACPI_SLEEP_CONTROL_PORT, &[0x34]), "acpi");
        assert_eq!(s.wait_exit(|| None), GuestExit::Poweroff { via: "acpi" });
        let (d, s, _) = devices();
        d.pio_write(ACPI_RESET_PORT, &[ACPI_RESET_VALUE]);
        assert_eq!(s.wait_exit(|| None), GuestExit::Reboot { via: "acpi" });
        let (d, s, _) = devices();
        d.pio_write(I8042_COMMAND_PORT, &[0xfe]);
        assert_eq!(s.wait_exit(|| None), GuestExit::Reboot { via: "i8042" });
    }

    #[test]
    fn unclaimed_ports_float_high() {
        let (d, s, _) = devices();
        let mut b = [0u8; 4];
        assert_eq!(d.pio_read(0xcf8, &mut b), "unclaimed");
        assert_eq!(b, [0xff; 4]);
        assert_eq!(d.pio_write(0x80, &[1]), "unclaimed");
        assert_eq!(d.pio_write(0x80, &[]), "unclaimed");
        assert!(!s.should_stop());
    }

    #[test]
    fn serial_output_raises_its_interrupt() {
        let (d, _, irq) = devices();
        // Enable the THR-empty interrupt, then transmit one byte.
        d.pio_write(COM1_PORT + 1, &[0x02]);
        d.pio_write(COM1_PORT, b"A");
        assert!(irq.read().unwrap() >= 1);
        let mut lsr = [0u8];
        d.pio_read(COM1_PORT + 5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0, "transmitter holding register empty");
    }

    #[test]
    fn boot_marker_needs_the_magic() {
        let (d, s, _) = devices();
        s.mark_boot_start();
        assert_eq!(d.mmio_write(BOOT_TIMER_ADDR, &[1]), "boot-timer");
        assert!(s.milestones().is_empty());
        d.mmio_write(BOOT_TIMER_ADDR, &[BOOT_TIMER_MAGIC]);
        assert_eq!(s.milestones()[0].name, "boot_marker");
        assert_eq!(s.memory().map(|m| m.0), Some("boot_marker"));
    }
}
