//! `isla-virtio`: the virtio devices of an isla microVM and their virtio-mmio transport.
//!
//! The crate's role is everything between a guest's virtio driver and the host resources behind
//! it, with the KVM parts left to the monitor (`isla-vmm`): the monitor forwards MMIO exits in a
//! device's 4 KiB window to [`MmioTransport::read`]/[`MmioTransport::write`], registers each of
//! [`MmioTransport::queue_evts`] with `KVM_IOEVENTFD` (window base + 0x50, datamatch = queue
//! index), registers the irqfd it put in the device's [`Interrupt`] on the device's GSI, and runs
//! one [`EventLoop`] on a thread named `isla-io`. All device work (queue processing, TAP and
//! socket I/O, rate-limiter timers) happens on that one epoll loop, never on a vCPU thread.
//!
//! Main types:
//! - [`MmioTransport`]: virtio-mmio version 2 (virtio 1.x "modern") register window: status
//!   state machine, feature negotiation, queue set-up, validation at `DRIVER_OK`.
//! - [`VirtioDevice`]: what a device implements; [`ActivateContext`] is what it gets at `DRIVER_OK`.
//! - [`Interrupt`]: interrupt status bits plus the irqfd; also how a device declares itself
//!   broken ([`Interrupt::set_needs_reset`] sets `DEVICE_NEEDS_RESET` and raises a
//!   configuration-change interrupt, as virtio 1.x section 2.1.1 asks).
//! - [`EventLoop`] / [`EventLoopHandle`]: the epoll loop; handlers are `FnMut(u32)` closures
//!   keyed by a [`Token`], addable and removable from any thread.
//! - Devices: [`block::Block`], [`net::Net`] (with [`tap::Tap`]), [`rng::Rng`], [`vsock::Vsock`],
//!   [`balloon::Balloon`]; each has a serde config struct. [`rate_limiter`] holds the token buckets.
//!
//! ```text
//! pub type GuestMemory = vm_memory::GuestMemoryMmap;
//! Interrupt::new(irqfd: EventFd) -> Interrupt
//!   .signal_used_queue() / .signal_config_change() / .set_needs_reset() -> io::Result<()>
//! EventLoop::new() -> io::Result<(EventLoop, EventLoopHandle)>;  EventLoop::run(self)
//! EventLoopHandle::add(fd, events: u32, Box<dyn FnMut(u32) + Send>) -> io::Result<Token>
//!   .modify(token, events) -> io::Result<()>; .remove(token); .stop()
//! MmioTransport::new(mem, Arc<Mutex<dyn VirtioDevice>>, Arc<Interrupt>, EventLoopHandle) -> io::Result<_>
//!   .queue_evts() -> &[EventFd]; .read(offset, &mut [u8]); .write(offset, &[u8]); .status() -> u32
//! Block::new(BlockConfig) -> Result<Block, DeviceError>      (also Net, Rng, Vsock, Balloon)
//! Balloon::handle() -> BalloonHandle { set_target_mib, stats, actual_mib }
//! ```
//!
//! Hostile guests: every descriptor chain goes through [`queue::pop_chain`], which refuses loops,
//! out-of-range indices, chains longer than the queue, chains over 4 GiB, and buffers not wholly
//! inside guest memory. A structurally broken chain, or an available index that jumps by more
//! than the queue size, makes the device stop using its queues and set `DEVICE_NEEDS_RESET`; a
//! well-formed chain carrying a bad request (wrong direction, short header, sector out of range)
//! gets the device's error status (`VIRTIO_BLK_S_IOERR` and the like). All guest memory access
//! goes through `vm-memory`, which bounds-checks every access, so nothing outside the guest's
//! regions is ever touched.
//!
//! Hand-written on purpose: the rate limiter (Firecracker's is not published as a crate), the
//! vsock and balloon device models (no maintained crate implements them for `virtio-queue` 0.18),
//! and the epoll loop (a few dozen lines over `vmm-sys-util`'s `Epoll`; `event-manager` would
//! make handlers own their fds, which does not fit devices that are reset and re-activated).

pub mod balloon;
pub mod block;
pub mod event_loop;
pub mod mmio;
pub mod net;
pub mod queue;
pub mod rate_limiter;
pub mod rng;
mod sys;
pub mod tap;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod vsock;

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use vmm_sys_util::eventfd::EventFd;

pub use event_loop::{EventLoop, EventLoopHandle, Token};
pub use mmio::MmioTransport;

/// The monitor's guest memory type.
pub type GuestMemory = vm_memory::GuestMemoryMmap;

/// `VIRTIO_F_VERSION_1`: every device here is a virtio 1.x ("modern") device.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// `VIRTIO_F_RING_INDIRECT_DESC`.
pub const VIRTIO_F_RING_INDIRECT_DESC: u64 = 1 << 28;

/// InterruptStatus bit: a used ring was updated.
pub const INT_VRING: u32 = 1;
/// InterruptStatus bit: the configuration space changed (or the device needs a reset).
pub const INT_CONFIG: u32 = 2;

/// How a device raises its interrupt: InterruptStatus bits the driver reads and acknowledges
/// through the transport, and an irqfd (registered by the monitor on the device's GSI) that is
/// written to inject the interrupt.
pub struct Interrupt {
    status: AtomicU32,
    irqfd: EventFd,
    needs_reset: AtomicBool,
    config_generation: AtomicU32,
}

impl Interrupt {
    /// Wraps the irqfd of the device's interrupt line.
    pub fn new(irqfd: EventFd) -> Self {
        Interrupt {
            status: AtomicU32::new(0),
            irqfd,
            needs_reset: AtomicBool::new(false),
            config_generation: AtomicU32::new(0),
        }
    }

    /// Sets the used-ring bit and injects the interrupt.
    pub fn signal_used_queue(&self) -> io::Result<()> {
        self.status.fetch_or(INT_VRING, Ordering::SeqCst);
        self.irqfd.write(1)
    }

    /// Bumps the configuration generation, sets the configuration-change bit and injects the
    /// interrupt.
    pub fn signal_config_change(&self) -> io::Result<()> {
        self.config_generation.fetch_add(1, Ordering::SeqCst);
        self.status.fetch_or(INT_CONFIG, Ordering::SeqCst);
        self.irqfd.write(1)
    }

    /// Declares the device broken: the status register shows `DEVICE_NEEDS_RESET` until the
    /// driver resets the device, and a configuration-change interrupt tells the driver.
    pub fn set_needs_reset(&self) -> io::Result<()> {
        if self.needs_reset.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        self.signal_config_change()
    }

    /// True after [`set_needs_reset`](Self::set_needs_reset), until the next device reset.
    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::SeqCst)
    }

    /// The InterruptStatus register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// The ConfigGeneration register.
    pub fn config_generation(&self) -> u32 {
        self.config_generation.load(Ordering::SeqCst)
    }

    /// InterruptACK: clears the given bits.
    pub(crate) fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Device reset: no pending interrupt, no failure.
    pub(crate) fn reset(&self) {
        self.status.store(0, Ordering::SeqCst);
        self.needs_reset.store(false, Ordering::SeqCst);
    }
}

/// What a device gets when the driver sets `DRIVER_OK`.
pub struct ActivateContext {
    /// Guest memory.
    pub mem: GuestMemory,
    /// The device's interrupt.
    pub interrupt: Arc<Interrupt>,
    /// One queue per entry of [`VirtioDevice::queue_max_sizes`], as the driver configured it.
    /// Queues the driver left disabled have `ready() == false`; enabled ones are validated
    /// (ring addresses inside guest memory and aligned, size a power of two within the maximum).
    pub queues: Vec<virtio_queue::Queue>,
    /// The notification EventFd of each queue (clones of the transport's).
    pub queue_evts: Vec<EventFd>,
    /// Features the driver accepted.
    pub acked_features: u64,
    /// Where the device registers its fds.
    pub event_loop: EventLoopHandle,
}

/// Why a device could not be activated (the transport then sets `DEVICE_NEEDS_RESET`).
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// A queue the device needs is not enabled or not valid.
    #[error("queue {index}: {reason}")]
    BadQueue {
        /// Queue index.
        index: usize,
        /// What is wrong.
        reason: String,
    },
    /// Registering with the event loop (or another host call) failed.
    #[error("activation: {0}")]
    Io(#[from] io::Error),
}

/// Errors creating a device from its configuration.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The disk image could not be opened.
    #[error("block device {path}: {source}")]
    Disk {
        /// The image.
        path: std::path::PathBuf,
        /// Why.
        source: isla_disk::DiskError,
    },
    /// A configuration field is wrong.
    #[error("{field}: {reason}")]
    Config {
        /// The field, as named in the config struct.
        field: &'static str,
        /// What is wrong and how to fix it.
        reason: String,
    },
    /// A host resource (TAP, socket, timer) could not be set up.
    #[error("{what}: {source}")]
    Host {
        /// What was being set up.
        what: String,
        /// The OS error.
        source: io::Error,
    },
}

impl DeviceError {
    pub(crate) fn host(what: impl Into<String>) -> impl FnOnce(io::Error) -> DeviceError {
        let what = what.into();
        move |source| DeviceError::Host { what, source }
    }
}

/// A virtio device model behind a transport.
pub trait VirtioDevice: Send {
    /// `VIRTIO_ID_*` of the device.
    fn device_type(&self) -> u32;
    /// Largest size of each queue (each a power of two); the length is the queue count.
    fn queue_max_sizes(&self) -> &[u16];
    /// Features offered (always including [`VIRTIO_F_VERSION_1`]).
    fn avail_features(&self) -> u64;
    /// Reads the device configuration space; bytes past its end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device configuration space (most fields are read-only and ignore writes).
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device on the driver's queues.
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError>;
    /// Stops using the queues and forgets them; false if the device cannot be reset.
    fn reset(&mut self) -> bool;
}

/// Locks a mutex shared with the event loop; a panicked holder does not make the state unusable
/// (handlers keep it consistent between statements).
pub(crate) fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Copies `src` into a configuration-space read at `offset`; bytes outside `src` read as zero.
pub(crate) fn read_config_bytes(src: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else { return };
    if start >= src.len() {
        return;
    }
    let n = data.len().min(src.len() - start);
    data[..n].copy_from_slice(&src[start..start + n]);
}
