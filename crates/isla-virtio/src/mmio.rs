//! The virtio-mmio transport, version 2 (virtio 1.x section 4.2.2).
//!
//! Registers are 32-bit and little-endian; other widths read as zero and writes of other widths
//! are ignored, except in the configuration space (offset 0x100 and up), which takes any width.
//! The status register follows the driver-initialisation sequence: features can only be written
//! between `DRIVER` and `FEATURES_OK`, `FEATURES_OK` only sticks when the driver accepted a subset
//! of the offered features including `VERSION_1`, and queue registers only change before
//! `DRIVER_OK`. At `DRIVER_OK` every enabled queue is validated and the device activated; a
//! failure there sets `DEVICE_NEEDS_RESET`. Writing 0 to the status register resets the device.

use std::io;
use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use crate::{lock, ActivateContext, EventLoopHandle, GuestMemory, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};

/// "virt" in little-endian.
pub const MMIO_MAGIC: u32 = 0x7472_6976;
/// virtio-mmio version 2 (modern).
pub const MMIO_VERSION: u32 = 2;
/// Vendor ID reported ("ISLA" would not fit the PCI-style convention; QEMU uses this one too).
pub const VENDOR_ID: u32 = 0x554d_4551;

/// Register offsets.
pub mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_AVAIL_LOW: u64 = 0x090;
    pub const QUEUE_AVAIL_HIGH: u64 = 0x094;
    pub const QUEUE_USED_LOW: u64 = 0x0a0;
    pub const QUEUE_USED_HIGH: u64 = 0x0a4;
    pub const SHM_SEL: u64 = 0x0ac;
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    pub const SHM_BASE_LOW: u64 = 0x0b8;
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// Device status bits.
pub mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const NEEDS_RESET: u32 = 0x40;
    pub const FAILED: u32 = 0x80;
}

/// One device's 4 KiB virtio-mmio window.
pub struct MmioTransport {
    mem: GuestMemory,
    device: Arc<Mutex<dyn VirtioDevice>>,
    interrupt: Arc<Interrupt>,
    event_loop: EventLoopHandle,
    queues: Vec<Queue>,
    /// A QueueNum write that was not a power of two within the maximum, per queue.
    bad_size: Vec<bool>,
    queue_evts: Vec<EventFd>,
    status: u32,
    features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    activated: bool,
}

impl MmioTransport {
    /// Creates the window; one non-blocking EventFd per queue.
    pub fn new(
        mem: GuestMemory,
        device: Arc<Mutex<dyn VirtioDevice>>,
        interrupt: Arc<Interrupt>,
        event_loop: EventLoopHandle,
    ) -> io::Result<Self> {
        let sizes = lock(&device).queue_max_sizes().to_vec();
        let mut queues = Vec::with_capacity(sizes.len());
        let mut queue_evts = Vec::with_capacity(sizes.len());
        for (i, &max) in sizes.iter().enumerate() {
            let q = Queue::new(max).map_err(|e| {
                io::Error::new(io::ErrorKind::InvalidInput, format!("queue {i}: maximum size {max}: {e}"))
            })?;
            queues.push(q);
            queue_evts.push(EventFd::new(libc::EFD_NONBLOCK)?);
        }
        Ok(MmioTransport {
            mem,
            device,
            interrupt,
            event_loop,
            bad_size: vec![false; queues.len()],
            queues,
            queue_evts,
            status: 0,
            features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            activated: false,
        })
    }

    /// The queue notification EventFds, in queue order. Register each with `KVM_IOEVENTFD` at
    /// (window base + 0x50, 4 bytes, datamatch = queue index). Without that, QueueNotify writes
    /// reach [`write`](Self::write), which signals the same EventFd.
    pub fn queue_evts(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// The device status as the driver reads it.
    pub fn status(&self) -> u32 {
        let mut s = self.status;
        if self.interrupt.needs_reset() {
            s |= status::NEEDS_RESET;
        }
        s
    }

    /// True once the device runs (after `DRIVER_OK`, until reset).
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    fn selected(&mut self) -> Option<usize> {
        let i = self.queue_sel as usize;
        (i < self.queues.len()).then_some(i)
    }

    /// MMIO read of `data.len()` bytes at `offset` in the window.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            lock(&self.device).read_config(offset - reg::CONFIG, data);
            return;
        }
        data.fill(0);
        if data.len() != 4 {
            tracing::debug!("virtio-mmio: {}-byte read of register {offset:#x} ignored", data.len());
            return;
        }
        let v = match offset {
            reg::MAGIC => MMIO_MAGIC,
            reg::VERSION => MMIO_VERSION,
            reg::DEVICE_ID => lock(&self.device).device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => {
                let f = lock(&self.device).avail_features();
                match self.features_sel {
                    0 => f as u32,
                    1 => (f >> 32) as u32,
                    _ => 0,
                }
            }
            reg::QUEUE_NUM_MAX => self.selected().map_or(0, |i| u32::from(self.queues[i].max_size())),
            reg::QUEUE_READY => self.selected().map_or(0, |i| u32::from(self.queues[i].ready())),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS => self.status(),
            // No shared memory regions: length all ones means "none" (virtio 1.2, 4.2.2).
            reg::SHM_LEN_LOW | reg::SHM_LEN_HIGH | reg::SHM_BASE_LOW | reg::SHM_BASE_HIGH => u32::MAX,
            reg::CONFIG_GENERATION => self.interrupt.config_generation(),
            _ => 0,
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    /// MMIO write at `offset` in the window.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            if self.status & status::DRIVER != 0 {
                lock(&self.device).write_config(offset - reg::CONFIG, data);
            }
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            tracing::debug!("virtio-mmio: {}-byte write of register {offset:#x} ignored", data.len());
            return;
        };
        let v = u32::from_le_bytes(bytes);
        let queue_setup = self.status & status::FEATURES_OK != 0 && !self.activated;
        match offset {
            reg::DEVICE_FEATURES_SEL => self.features_sel = v,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            reg::DRIVER_FEATURES => {
                if self.status & status::DRIVER != 0 && self.status & status::FEATURES_OK == 0 {
                    match self.driver_features_sel {
                        0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v),
                        1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32),
                        _ => {}
                    }
                }
            }
            reg::QUEUE_SEL => self.queue_sel = v,
            reg::QUEUE_NOTIFY => {
                if let Some(evt) = self.queue_evts.get(v as usize) {
                    if let Err(e) = evt.write(1) {
                        tracing::warn!("virtio-mmio: queue {v} notify: {e}");
                    }
                }
            }
            reg::INTERRUPT_ACK => self.interrupt.ack(v),
            reg::STATUS => self.set_status(v),
            _ if queue_setup => self.write_queue_reg(offset, v),
            _ => tracing::debug!("virtio-mmio: write {v:#x} to {offset:#x} in status {:#x} ignored", self.status),
        }
    }

    fn write_queue_reg(&mut self, offset: u64, v: u32) {
        let Some(i) = self.selected() else { return };
        let q = &mut self.queues[i];
        match offset {
            reg::QUEUE_NUM => {
                // Remembered rather than refused: activation fails on it.
                self.bad_size[i] = q.try_set_size(v.try_into().unwrap_or(0)).is_err();
            }
            reg::QUEUE_READY => q.set_ready(v == 1),
            reg::QUEUE_DESC_LOW => q.set_desc_table_address(Some(v), None),
            reg::QUEUE_DESC_HIGH => q.set_desc_table_address(None, Some(v)),
            reg::QUEUE_AVAIL_LOW => q.set_avail_ring_address(Some(v), None),
            reg::QUEUE_AVAIL_HIGH => q.set_avail_ring_address(None, Some(v)),
            reg::QUEUE_USED_LOW => q.set_used_ring_address(Some(v), None),
            reg::QUEUE_USED_HIGH => q.set_used_ring_address(None, Some(v)),
            _ => {}
        }
    }

    fn set_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let new = v & !self.status;
        if v & self.status != self.status {
            // Clearing bits other than by a reset is not allowed.
            tracing::debug!("virtio-mmio: status {:#x} -> {v:#x} ignored", self.status);
            return;
        }
        if new & status::FAILED != 0 {
            self.status |= status::FAILED;
            return;
        }
        if new & status::FEATURES_OK != 0 {
            let offered = lock(&self.device).avail_features();
            let ok = self.status & status::DRIVER != 0
                && self.driver_features & !offered == 0
                && self.driver_features & VIRTIO_F_VERSION_1 != 0;
            if !ok {
                tracing::warn!(
                    "virtio-mmio: driver features {:#x} refused (offered {offered:#x}, VERSION_1 required)",
                    self.driver_features
                );
                self.status |= v & !status::FEATURES_OK;
                return;
            }
        }
        if new & status::DRIVER_OK != 0 && self.status & status::FEATURES_OK == 0 {
            tracing::warn!("virtio-mmio: DRIVER_OK without FEATURES_OK ignored");
            return;
        }
        self.status = v;
        if new & status::DRIVER_OK != 0 {
            self.activate();
        }
    }

    fn activate(&mut self) {
        if let Err(reason) = self.validate_queues() {
            tracing::warn!("virtio-mmio: activation refused: {reason}");
            self.mark_broken();
            return;
        }
        let mut queue_evts = Vec::with_capacity(self.queue_evts.len());
        for e in &self.queue_evts {
            match e.try_clone() {
                Ok(c) => queue_evts.push(c),
                Err(e) => {
                    tracing::warn!("virtio-mmio: cloning a queue EventFd: {e}");
                    self.mark_broken();
                    return;
                }
            }
        }
        let mut queues = Vec::with_capacity(self.queues.len());
        for q in &self.queues {
            match Queue::try_from(q.state()) {
                Ok(q) => queues.push(q),
                Err(e) => {
                    tracing::warn!("virtio-mmio: copying a queue: {e}");
                    self.mark_broken();
                    return;
                }
            }
        }
        let ctx = ActivateContext {
            mem: self.mem.clone(),
            interrupt: self.interrupt.clone(),
            queues,
            queue_evts,
            acked_features: self.driver_features,
            event_loop: self.event_loop.clone(),
        };
        match lock(&self.device).activate(ctx) {
            Ok(()) => self.activated = true,
            Err(e) => {
                tracing::warn!("virtio-mmio: device activation failed: {e}");
                self.mark_broken();
            }
        }
    }

    fn validate_queues(&self) -> Result<(), String> {
        for (i, q) in self.queues.iter().enumerate() {
            if !q.ready() {
                continue;
            }
            if self.bad_size[i] {
                return Err(format!("queue {i}: size is not a power of two up to {}", q.max_size()));
            }
            if !q.is_valid(&self.mem) {
                return Err(format!(
                    "queue {i}: rings (desc {:#x}, avail {:#x}, used {:#x}, size {}) are not inside guest memory or misaligned",
                    q.desc_table(),
                    q.avail_ring(),
                    q.used_ring(),
                    q.size()
                ));
            }
        }
        if !self.queues.iter().any(|q| q.ready()) {
            return Err("no queue enabled".into());
        }
        Ok(())
    }

    fn mark_broken(&self) {
        if let Err(e) = self.interrupt.set_needs_reset() {
            tracing::warn!("virtio-mmio: raising interrupt: {e}");
        }
    }

    fn reset(&mut self) {
        if self.activated && !lock(&self.device).reset() {
            // The device keeps running; the driver sees the old status and may retry.
            tracing::warn!("virtio-mmio: device refused the reset");
            return;
        }
        self.activated = false;
        self.status = 0;
        self.features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        for q in &mut self.queues {
            q.reset();
        }
        self.bad_size.fill(false);
        for e in &self.queue_evts {
            let _ = e.read();
        }
        self.interrupt.reset();
    }
}
