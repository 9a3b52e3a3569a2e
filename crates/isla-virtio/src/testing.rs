//! A test driver that plays the guest: it owns guest memory, drives an [`MmioTransport`] through
//! the virtio-mmio register sequence, lays out split virtqueues, posts descriptor chains, kicks
//! queues and reads used rings, with the device's [`EventLoop`] running on its own thread.
//!
//! Guest memory is a window of a memfd with guard areas on both sides filled with a pattern;
//! [`TestGuest::outside_untouched`] checks the pattern, so a test can assert that the device never
//! wrote outside the guest. Built for this crate's tests and, with the `testing` feature, for the
//! monitor's.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, FileOffset, GuestAddress};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::mmio::{reg, status};
use crate::{EventLoop, EventLoopHandle, GuestMemory, Interrupt, MmioTransport, VirtioDevice};

/// `VRING_DESC_F_NEXT`.
pub const DESC_NEXT: u16 = 1;
/// `VRING_DESC_F_WRITE`.
pub const DESC_WRITE: u16 = 2;
/// `VRING_DESC_F_INDIRECT`.
pub const DESC_INDIRECT: u16 = 4;

/// Guest memory size of a [`TestGuest`].
pub const MEM_SIZE: usize = 16 << 20;
/// Guard bytes on each side of guest memory in the backing memfd.
const GUARD: usize = 1 << 20;
/// Pattern byte of the guards.
const GUARD_BYTE: u8 = 0xa5;
/// Where queue `i`'s rings go: `QUEUE_BASE + i * QUEUE_STRIDE`.
const QUEUE_BASE: u64 = 0x10000;
const QUEUE_STRIDE: u64 = 0x10000;
/// Buffers are allocated from here up.
const HEAP_START: u64 = 0x20_0000;
/// How long a wait for the device lasts before the test fails.
pub const WAIT: Duration = Duration::from_secs(20);

/// One descriptor as the test describes it: (guest address, length, writable by the device).
pub type Buf = (u64, u32, bool);

#[derive(Debug, Clone, Copy)]
struct DriverQueue {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

/// The guest side of one device.
pub struct TestGuest {
    /// Guest memory (shared with the device).
    pub mem: GuestMemory,
    /// The device's register window.
    pub transport: MmioTransport,
    /// The device's interrupt (status bits, needs-reset flag).
    pub interrupt: Arc<Interrupt>,
    /// The irqfd the device writes.
    pub irq: EventFd,
    /// The event loop's handle.
    pub event_loop: EventLoopHandle,
    irq_epoll: Epoll,
    thread: Option<JoinHandle<()>>,
    backing: Option<File>,
    queues: Vec<DriverQueue>,
    heap: u64,
}

impl TestGuest {
    /// Guest memory in a guarded memfd window (see the module docs).
    pub fn new(device: Arc<Mutex<dyn VirtioDevice>>) -> Self {
        let fd = rustix::fs::memfd_create("isla-virtio-test", rustix::fs::MemfdFlags::CLOEXEC).expect("memfd");
        let file = File::from(fd);
        file.set_len((MEM_SIZE + 2 * GUARD) as u64).expect("memfd size");
        let guard = vec![GUARD_BYTE; GUARD];
        file.write_all_at(&guard, 0).expect("guard");
        file.write_all_at(&guard, (GUARD + MEM_SIZE) as u64).expect("guard");
        let dup = file.try_clone().expect("dup memfd");
        let mem = GuestMemory::from_ranges_with_files([(
            GuestAddress(0),
            MEM_SIZE,
            Some(FileOffset::new(dup, GUARD as u64)),
        )])
        .expect("guest memory");
        Self::with_memory(device, mem, Some(file))
    }

    /// Private anonymous guest memory (as the monitor's), for the balloon.
    pub fn new_anonymous(device: Arc<Mutex<dyn VirtioDevice>>) -> Self {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("guest memory");
        Self::with_memory(device, mem, None)
    }

    fn with_memory(device: Arc<Mutex<dyn VirtioDevice>>, mem: GuestMemory, backing: Option<File>) -> Self {
        let (el, handle) = EventLoop::new().expect("event loop");
        let thread = std::thread::Builder::new().name("isla-io-test".into()).spawn(move || el.run()).expect("thread");
        let irq = EventFd::new(libc::EFD_NONBLOCK).expect("irqfd");
        let interrupt = Arc::new(Interrupt::new(irq.try_clone().expect("irqfd clone")));
        let irq_epoll = Epoll::new().expect("epoll");
        irq_epoll.ctl(ControlOperation::Add, irq.as_raw_fd(), EpollEvent::new(EventSet::IN, 0)).expect("epoll add");
        let transport = MmioTransport::new(mem.clone(), device, interrupt.clone(), handle.clone()).expect("transport");
        TestGuest {
            mem,
            transport,
            interrupt,
            irq,
            event_loop: handle,
            irq_epoll,
            thread: Some(thread),
            backing,
            queues: Vec::new(),
            heap: HEAP_START,
        }
    }

    /// Reads a 32-bit register.
    pub fn read_reg(&mut self, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        self.transport.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    /// Writes a 32-bit register.
    pub fn write_reg(&mut self, offset: u64, v: u32) {
        self.transport.write(offset, &v.to_le_bytes());
    }

    /// Reads `len` bytes of configuration space.
    pub fn read_config(&mut self, offset: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        self.transport.read(reg::CONFIG + offset, &mut b);
        b
    }

    /// The features the device offers.
    pub fn device_features(&mut self) -> u64 {
        self.write_reg(reg::DEVICE_FEATURES_SEL, 0);
        let lo = self.read_reg(reg::DEVICE_FEATURES);
        self.write_reg(reg::DEVICE_FEATURES_SEL, 1);
        let hi = self.read_reg(reg::DEVICE_FEATURES);
        (u64::from(hi) << 32) | u64::from(lo)
    }

    /// Reset, ACKNOWLEDGE, DRIVER, features (`wanted` & offered), FEATURES_OK. Returns the status.
    pub fn negotiate(&mut self, wanted: u64) -> u32 {
        self.write_reg(reg::STATUS, 0);
        self.write_reg(reg::STATUS, status::ACKNOWLEDGE);
        self.write_reg(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        let features = self.device_features() & wanted;
        self.write_reg(reg::DRIVER_FEATURES_SEL, 0);
        self.write_reg(reg::DRIVER_FEATURES, features as u32);
        self.write_reg(reg::DRIVER_FEATURES_SEL, 1);
        self.write_reg(reg::DRIVER_FEATURES, (features >> 32) as u32);
        self.write_reg(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        self.read_reg(reg::STATUS)
    }

    /// Configures queue `index` with `size` entries at explicit ring addresses and enables it.
    pub fn setup_queue_at(&mut self, index: u16, size: u16, desc: u64, avail: u64, used: u64) {
        // A fresh ring, as a driver allocates at set-up (ignored if the addresses are not RAM).
        let ring_bytes = vec![0u8; usize::from(size) * 16];
        for at in [desc, avail, used] {
            let _ = self.mem.write_slice(&ring_bytes, GuestAddress(at));
        }
        self.write_reg(reg::QUEUE_SEL, u32::from(index));
        self.write_reg(reg::QUEUE_NUM, u32::from(size));
        for (lo, v) in [(reg::QUEUE_DESC_LOW, desc), (reg::QUEUE_AVAIL_LOW, avail), (reg::QUEUE_USED_LOW, used)] {
            self.write_reg(lo, v as u32);
            self.write_reg(lo + 4, (v >> 32) as u32);
        }
        self.write_reg(reg::QUEUE_READY, 1);
        let q = DriverQueue { size, desc, avail, used, next_desc: 0, avail_idx: 0, used_seen: 0 };
        let i = usize::from(index);
        if self.queues.len() <= i {
            self.queues.resize(i + 1, q);
        }
        self.queues[i] = q;
    }

    /// Configures queue `index` with `size` entries at its default place and enables it.
    pub fn setup_queue(&mut self, index: u16, size: u16) {
        let base = QUEUE_BASE + u64::from(index) * QUEUE_STRIDE;
        self.setup_queue_at(index, size, base, base + 0x4000, base + 0x8000);
    }

    /// Sets DRIVER_OK; returns the status read back.
    pub fn driver_ok(&mut self) -> u32 {
        let s = self.read_reg(reg::STATUS);
        self.write_reg(reg::STATUS, s | status::DRIVER_OK);
        self.read_reg(reg::STATUS)
    }

    /// The whole initialisation: features, `queue_sizes.len()` queues, DRIVER_OK.
    pub fn init(&mut self, wanted: u64, queue_sizes: &[u16]) -> u32 {
        let s = self.negotiate(wanted);
        assert_ne!(s & status::FEATURES_OK, 0, "device refused features {wanted:#x}");
        for (i, &size) in queue_sizes.iter().enumerate() {
            self.setup_queue(i as u16, size);
        }
        self.driver_ok()
    }

    /// Allocates `len` bytes of guest memory (8-byte aligned, zeroed).
    pub fn alloc(&mut self, len: usize) -> u64 {
        let addr = self.heap;
        self.heap = (self.heap + len as u64 + 7) & !7;
        assert!(self.heap <= MEM_SIZE as u64, "test guest out of memory");
        self.mem.write_slice(&vec![0u8; len], GuestAddress(addr)).expect("zero buffer");
        addr
    }

    /// Allocates a buffer holding `data`.
    pub fn alloc_with(&mut self, data: &[u8]) -> u64 {
        let addr = self.alloc(data.len());
        self.write(addr, data);
        addr
    }

    /// Writes guest memory.
    pub fn write(&self, addr: u64, data: &[u8]) {
        self.mem.write_slice(data, GuestAddress(addr)).expect("guest write");
    }

    /// Reads guest memory.
    pub fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        self.mem.read_slice(&mut b, GuestAddress(addr)).expect("guest read");
        b
    }

    /// Writes descriptor `index` of queue `q` directly (for hostile chains).
    pub fn write_desc(&self, q: u16, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let dq = self.queues[usize::from(q)];
        self.write_desc_at(dq.desc + u64::from(index) * 16, addr, len, flags, next);
    }

    /// Writes a descriptor at any guest address (for indirect tables).
    pub fn write_desc_at(&self, at: u64, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        self.write(at, &d);
    }

    /// Puts `head` in the next available slot of queue `q` and bumps the available index.
    pub fn publish(&mut self, q: u16, head: u16) {
        let dq = &mut self.queues[usize::from(q)];
        let slot = dq.avail + 4 + u64::from(dq.avail_idx % dq.size) * 2;
        dq.avail_idx = dq.avail_idx.wrapping_add(1);
        let (avail, idx) = (dq.avail, dq.avail_idx);
        self.write(slot, &head.to_le_bytes());
        self.write(avail + 2, &idx.to_le_bytes());
    }

    /// Sets queue `q`'s available index to any value (for hostile drivers).
    pub fn set_avail_idx(&mut self, q: u16, idx: u16) {
        let dq = &mut self.queues[usize::from(q)];
        dq.avail_idx = idx;
        let avail = dq.avail;
        self.write(avail + 2, &idx.to_le_bytes());
    }

    /// Adds a chain of `bufs` to queue `q` (descriptors taken round-robin) and publishes it.
    pub fn add_chain(&mut self, q: u16, bufs: &[Buf]) -> u16 {
        let dq = self.queues[usize::from(q)];
        let head = dq.next_desc;
        let mut idx = head;
        for (i, &(addr, len, writable)) in bufs.iter().enumerate() {
            let next = (idx + 1) % dq.size;
            let mut flags = if writable { DESC_WRITE } else { 0 };
            if i + 1 < bufs.len() {
                flags |= DESC_NEXT;
            }
            self.write_desc(q, idx, addr, len, flags, next);
            idx = next;
        }
        self.queues[usize::from(q)].next_desc = idx;
        self.publish(q, head);
        head
    }

    /// Notifies queue `q` through the QueueNotify register.
    pub fn kick(&mut self, q: u16) {
        self.write_reg(reg::QUEUE_NOTIFY, u32::from(q));
    }

    /// The used index of queue `q` as the device last wrote it.
    pub fn used_idx(&self, q: u16) -> u16 {
        let dq = self.queues[usize::from(q)];
        let b = self.read(dq.used + 2, 2);
        u16::from_le_bytes([b[0], b[1]])
    }

    /// New used entries (id, len) of queue `q` since the last call, without waiting.
    pub fn take_used(&mut self, q: u16) -> Vec<(u32, u32)> {
        let now = self.used_idx(q);
        let dq = self.queues[usize::from(q)];
        let mut out = Vec::new();
        let mut i = dq.used_seen;
        while i != now {
            let e = self.read(dq.used + 4 + u64::from(i % dq.size) * 8, 8);
            out.push((u32::from_le_bytes([e[0], e[1], e[2], e[3]]), u32::from_le_bytes([e[4], e[5], e[6], e[7]])));
            i = i.wrapping_add(1);
        }
        self.queues[usize::from(q)].used_seen = now;
        out
    }

    /// Waits until queue `q` has `n` new used entries and returns them; panics after [`WAIT`].
    pub fn wait_used(&mut self, q: u16, n: usize) -> Vec<(u32, u32)> {
        let mut got = Vec::new();
        let deadline = Instant::now() + WAIT;
        while got.len() < n {
            got.extend(self.take_used(q));
            if got.len() >= n {
                break;
            }
            assert!(Instant::now() < deadline, "queue {q}: {} of {n} used entries after {WAIT:?}", got.len());
            self.wait_irq();
        }
        got
    }

    /// Waits up to a millisecond for the device's interrupt, consuming it.
    fn wait_irq(&self) {
        let mut ev = [EpollEvent::default()];
        if matches!(self.irq_epoll.wait(1, &mut ev), Ok(n) if n > 0) {
            let _ = self.irq.read();
        }
    }

    /// Polls `cond` until true; panics after [`WAIT`] naming `what`.
    pub fn wait_until(&mut self, what: &str, mut cond: impl FnMut(&mut Self) -> bool) {
        let deadline = Instant::now() + WAIT;
        while !cond(self) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// The status register.
    pub fn status(&mut self) -> u32 {
        self.read_reg(reg::STATUS)
    }

    /// True when the guard areas around guest memory still hold their pattern (always true for
    /// anonymous memory, which has no guards).
    pub fn outside_untouched(&self) -> bool {
        let Some(f) = &self.backing else { return true };
        let mut buf = vec![0u8; GUARD];
        for start in [0, (GUARD + MEM_SIZE) as u64] {
            f.read_exact_at(&mut buf, start).expect("read guard");
            if buf.iter().any(|&b| b != GUARD_BYTE) {
                return false;
            }
        }
        true
    }
}

impl Drop for TestGuest {
    fn drop(&mut self) {
        // Reset first: the device removes its handlers before the loop goes away.
        self.write_reg(reg::STATUS, 0);
        self.event_loop.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
