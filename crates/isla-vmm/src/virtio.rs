//! The monitor's side of the virtio devices ([`isla_virtio`]): one virtio-mmio window and one GSI
//! per device, KVM irqfds for their interrupts and ioeventfds for their queue notifications, and
//! how the guest finds them (ACPI DSDT entries, or `virtio_mmio.device=` arguments when the
//! command line turns ACPI off).
//!
//! Device order, which is the guest's enumeration order: the root drive, the other drives, the
//! network interfaces, vsock, balloon, entropy. So `--rootfs` is always `/dev/vda`.

use std::sync::{Arc, Mutex};

use isla_arch::acpi::MmioDevice;
use isla_arch::layout::{VIRTIO_IRQ_BASE, VIRTIO_MMIO_SIZE, VIRTIO_MMIO_START};
use isla_virtio::balloon::{Balloon, BalloonHandle};
use isla_virtio::block::{Block, BlockConfig};
use isla_virtio::net::{Net, NetConfig as VirtioNetConfig};
use isla_virtio::rng::{Rng, RngConfig};
use isla_virtio::vsock::Vsock;
use isla_virtio::{EventLoopHandle, GuestMemory, Interrupt, MmioTransport, VirtioDevice};
use kvm_ioctls::{IoEventAddress, VmFd};
use vmm_sys_util::eventfd::EventFd;

use crate::config::{parse_mac, VmConfig};
use crate::{kvm_err, lock, VmmError};

/// Offset of the QueueNotify register in a virtio-mmio window.
const QUEUE_NOTIFY: u64 = 0x50;

/// One device in its window.
pub struct Slot {
    /// Guest physical base of the window.
    pub base: u64,
    transport: Mutex<MmioTransport>,
}

/// All virtio devices of a VM.
#[derive(Default)]
pub struct VirtioDevices {
    slots: Vec<Slot>,
    /// The balloon's control handle, if the VM has one.
    pub balloon: Option<BalloonHandle>,
    /// `root=/dev/vdX rw|ro`, if a drive is the root device.
    pub root_arg: Option<String>,
}

impl VirtioDevices {
    /// Creates the configured devices and wires each to KVM.
    pub fn create(vm: &VmFd, mem: &GuestMemory, cfg: &VmConfig, io: &EventLoopHandle) -> Result<Self, VmmError> {
        let mut out = VirtioDevices::default();
        let mut drives: Vec<_> = cfg.drives.iter().collect();
        drives.sort_by_key(|d| !d.is_root);
        for (i, d) in drives.iter().enumerate() {
            let block = Block::new(BlockConfig {
                path: d.path.clone(),
                read_only: d.read_only,
                format: None,
                id: Some(d.id.clone()),
                rate_limiter: d.rate_limiter,
            })
            .map_err(|e| VmmError::Setup(format!("drive `{}` ({}): {e}", d.id, d.path.display())))?;
            if d.is_root {
                let letter = (b'a' + i as u8) as char;
                out.root_arg = Some(format!("root=/dev/vd{letter} {}", if d.read_only { "ro" } else { "rw" }));
            }
            out.add(vm, mem, io, format!("block:{}", d.id), Arc::new(Mutex::new(block)))?;
        }
        for n in &cfg.net {
            let mac = n.mac.as_deref().map(|m| parse_mac(m, "--net mac")).transpose()?;
            let net = Net::new(VirtioNetConfig {
                tap_name: n.host_dev.clone(),
                mac,
                rx_rate_limiter: n.rx_rate_limiter,
                tx_rate_limiter: n.tx_rate_limiter,
            })
            .map_err(|e| VmmError::Setup(format!("network interface `{}`: {e}", n.id)))?;
            out.add(vm, mem, io, format!("net:{}", n.id), Arc::new(Mutex::new(net)))?;
        }
        if let Some(v) = &cfg.vsock {
            let vsock =
                Vsock::new(v.clone()).map_err(|e| VmmError::Setup(format!("vsock ({}): {e}", v.uds_path.display())))?;
            out.add(vm, mem, io, "vsock".into(), Arc::new(Mutex::new(vsock)))?;
        }
        if let Some(b) = &cfg.balloon {
            let balloon = Balloon::new(b.clone());
            out.balloon = Some(balloon.handle());
            out.add(vm, mem, io, "balloon".into(), Arc::new(Mutex::new(balloon)))?;
        }
        if cfg.entropy {
            out.add(vm, mem, io, "rng".into(), Arc::new(Mutex::new(Rng::new(RngConfig::default()))))?;
        }
        Ok(out)
    }

    fn add(
        &mut self,
        vm: &VmFd,
        mem: &GuestMemory,
        io: &EventLoopHandle,
        name: String,
        device: Arc<Mutex<dyn VirtioDevice>>,
    ) -> Result<(), VmmError> {
        let index = self.slots.len();
        let base = VIRTIO_MMIO_START + index as u64 * VIRTIO_MMIO_SIZE;
        let gsi = VIRTIO_IRQ_BASE + index as u32;
        let setup = |what: &str, e: std::io::Error| VmmError::Setup(format!("{name}: {what}: {e}"));
        let irqfd = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| setup("eventfd", e))?;
        vm.register_irqfd(&irqfd, gsi).map_err(kvm_err("KVM_IRQFD"))?;
        let transport = MmioTransport::new(mem.clone(), device, Arc::new(Interrupt::new(irqfd)), io.clone())
            .map_err(|e| setup("transport", e))?;
        for (queue, evt) in transport.queue_evts().iter().enumerate() {
            vm.register_ioevent(evt, &IoEventAddress::Mmio(base + QUEUE_NOTIFY), queue as u32)
                .map_err(kvm_err("KVM_IOEVENTFD"))?;
        }
        tracing::debug!("virtio {name}: window {base:#x}, GSI {gsi}");
        self.slots.push(Slot { base, transport: Mutex::new(transport) });
        Ok(())
    }

    /// The DSDT entries describing the windows.
    pub fn acpi_devices(&self) -> Vec<MmioDevice> {
        self.slots
            .iter()
            .enumerate()
            .map(|(i, s)| MmioDevice { base: s.base, len: VIRTIO_MMIO_SIZE, irq: VIRTIO_IRQ_BASE + i as u32 })
            .collect()
    }

    /// `virtio_mmio.device=` arguments, for guests booted without ACPI.
    pub fn cmdline_args(&self) -> Vec<String> {
        self.acpi_devices().iter().map(|d| format!("virtio_mmio.device=4K@{:#x}:{}", d.base, d.irq)).collect()
    }

    fn slot(&self, addr: u64) -> Option<&Slot> {
        let index = addr.checked_sub(VIRTIO_MMIO_START)? / VIRTIO_MMIO_SIZE;
        self.slots.get(usize::try_from(index).ok()?)
    }

    /// An MMIO read in a device window; `None` if no device owns the address.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> Option<&'static str> {
        let s = self.slot(addr)?;
        lock(&s.transport).read(addr - s.base, data);
        Some("virtio")
    }

    /// An MMIO write in a device window; `None` if no device owns the address.
    pub fn write(&self, addr: u64, data: &[u8]) -> Option<&'static str> {
        let s = self.slot(addr)?;
        lock(&s.transport).write(addr - s.base, data);
        Some("virtio")
    }
}

/// Whether a kernel command line turns ACPI off (then devices go on the command line instead).
pub fn acpi_disabled(cmdline: &str) -> bool {
    cmdline.split_whitespace().any(|w| w == "acpi=off")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acpi_off_is_recognised() {
        assert!(acpi_disabled("console=ttyS0 acpi=off quiet"));
        assert!(!acpi_disabled("console=ttyS0 acpi=noirq"));
    }
}
