//! virtio-balloon (virtio 1.x section 5.5): inflate, deflate, statistics and free page reporting.
//!
//! Queues are numbered as the driver numbers them: inflate (0), deflate (1), then the statistics
//! queue if `STATS_VQ` was accepted, then the reporting queue if `REPORTING` was accepted.
//!
//! - Inflate: the guest hands over 4 KiB page frame numbers; each run of contiguous valid pages
//!   is given back to the host with `madvise` (`MADV_DONTNEED` on private anonymous memory,
//!   `MADV_REMOVE` on shared file-backed memory). Frames outside guest memory are skipped.
//! - Deflate: nothing to do (a given-back page faults in again, zeroed, when the guest uses it).
//! - Statistics: the device keeps the driver's buffer, records the tags it carries, and returns
//!   it every `stats_polling_interval_s` seconds so the driver refills it.
//! - Free page reporting: each device-writable buffer is a free range the guest reports; its
//!   whole 4 KiB pages are given back like inflated ones.
//!
//! The host sets the target with [`BalloonHandle::set_target_mib`] (config change interrupt);
//! the guest reports its progress in the `actual` field.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};
use vmm_sys_util::timerfd::TimerFd;

use crate::event_loop::{deactivate, Activation, DeviceWorker, Registrations, EV_IN};
use crate::queue::{fail, Chain, VirtQueue};
use crate::{
    lock, read_config_bytes, sys, ActivateContext, ActivateError, GuestMemory, Interrupt, VirtioDevice,
    VIRTIO_F_VERSION_1,
};

/// Queue size (all queues).
pub const QUEUE_SIZE: u16 = 256;
/// Balloon page size (fixed by the protocol).
pub const PAGE: u64 = 4096;
/// Pages per MiB.
const PAGES_PER_MIB: u32 = 256;
/// Most PFNs taken from one inflate chain (Linux sends at most 256).
const MAX_PFNS: usize = 4096;

/// Feature bits (virtio 1.x 5.5.3).
pub mod features {
    pub const STATS_VQ: u64 = 1 << 1;
    pub const DEFLATE_ON_OOM: u64 = 1 << 2;
    pub const REPORTING: u64 = 1 << 5;
}

/// The balloon's configuration.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonConfig {
    /// Initial target size of the balloon.
    pub amount_mib: u32,
    /// Let the guest deflate when it runs out of memory.
    #[serde(default)]
    pub deflate_on_oom: bool,
    /// Statistics period; 0 turns statistics off.
    #[serde(default)]
    pub stats_polling_interval_s: u16,
    /// Offer free page reporting.
    #[serde(default)]
    pub free_page_reporting: bool,
}

/// The latest statistics the guest reported (absent: never reported).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct BalloonStats {
    pub swap_in: Option<u64>,
    pub swap_out: Option<u64>,
    pub major_faults: Option<u64>,
    pub minor_faults: Option<u64>,
    pub free_memory: Option<u64>,
    pub total_memory: Option<u64>,
    pub available_memory: Option<u64>,
    pub disk_caches: Option<u64>,
    pub hugetlb_allocations: Option<u64>,
    pub hugetlb_failures: Option<u64>,
    pub oom_kills: Option<u64>,
    pub alloc_stalls: Option<u64>,
    pub async_scans: Option<u64>,
    pub direct_scans: Option<u64>,
    pub async_reclaims: Option<u64>,
    pub direct_reclaims: Option<u64>,
}

impl BalloonStats {
    fn set(&mut self, tag: u16, val: u64) {
        let slot = match tag {
            0 => &mut self.swap_in,
            1 => &mut self.swap_out,
            2 => &mut self.major_faults,
            3 => &mut self.minor_faults,
            4 => &mut self.free_memory,
            5 => &mut self.total_memory,
            6 => &mut self.available_memory,
            7 => &mut self.disk_caches,
            8 => &mut self.hugetlb_allocations,
            9 => &mut self.hugetlb_failures,
            10 => &mut self.oom_kills,
            11 => &mut self.alloc_stalls,
            12 => &mut self.async_scans,
            13 => &mut self.direct_scans,
            14 => &mut self.async_reclaims,
            15 => &mut self.direct_reclaims,
            _ => return,
        };
        *slot = Some(val);
    }
}

#[derive(Default)]
struct Shared {
    target_pages: u32,
    actual_pages: u32,
    stats: BalloonStats,
    /// Pages given back to the host since creation (inflate and reporting).
    discarded_pages: u64,
    interrupt: Option<Arc<Interrupt>>,
}

/// Controls a balloon from any thread (the monitor's API).
#[derive(Clone)]
pub struct BalloonHandle(Arc<Mutex<Shared>>);

impl BalloonHandle {
    /// Sets the balloon's target and tells the guest (configuration change interrupt).
    pub fn set_target_mib(&self, mib: u32) -> io::Result<()> {
        let mut s = lock(&self.0);
        s.target_pages = mib.saturating_mul(PAGES_PER_MIB);
        match &s.interrupt {
            Some(i) => i.signal_config_change(),
            None => Ok(()),
        }
    }

    /// The target size.
    pub fn target_mib(&self) -> u32 {
        lock(&self.0).target_pages / PAGES_PER_MIB
    }

    /// The size the guest reports.
    pub fn actual_mib(&self) -> u32 {
        lock(&self.0).actual_pages / PAGES_PER_MIB
    }

    /// The latest statistics.
    pub fn stats(&self) -> BalloonStats {
        lock(&self.0).stats
    }

    /// 4 KiB pages given back to the host so far.
    pub fn discarded_pages(&self) -> u64 {
        lock(&self.0).discarded_pages
    }
}

/// The virtio-balloon device.
pub struct Balloon {
    features: u64,
    stats_interval: u16,
    shared: Arc<Mutex<Shared>>,
    active: Option<Activation<Worker>>,
}

impl Balloon {
    /// Creates the device with its initial target.
    pub fn new(cfg: BalloonConfig) -> Self {
        let mut features = VIRTIO_F_VERSION_1;
        if cfg.deflate_on_oom {
            features |= features::DEFLATE_ON_OOM;
        }
        if cfg.stats_polling_interval_s > 0 {
            features |= features::STATS_VQ;
        }
        if cfg.free_page_reporting {
            features |= features::REPORTING;
        }
        let shared = Shared { target_pages: cfg.amount_mib.saturating_mul(PAGES_PER_MIB), ..Default::default() };
        Balloon {
            features,
            stats_interval: cfg.stats_polling_interval_s,
            shared: Arc::new(Mutex::new(shared)),
            active: None,
        }
    }

    /// A handle for the monitor's API.
    pub fn handle(&self) -> BalloonHandle {
        BalloonHandle(self.shared.clone())
    }

    /// See [`BalloonHandle::set_target_mib`].
    pub fn set_target_mib(&self, mib: u32) -> io::Result<()> {
        self.handle().set_target_mib(mib)
    }

    /// See [`BalloonHandle::stats`].
    pub fn stats(&self) -> BalloonStats {
        self.handle().stats()
    }

    /// See [`BalloonHandle::actual_mib`].
    pub fn actual_mib(&self) -> u32 {
        self.handle().actual_mib()
    }
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        virtio_bindings::virtio_ids::VIRTIO_ID_BALLOON
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 4]
    }

    fn avail_features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let s = lock(&self.shared);
        let mut c = [0u8; 16];
        c[0..4].copy_from_slice(&s.target_pages.to_le_bytes());
        c[4..8].copy_from_slice(&s.actual_pages.to_le_bytes());
        read_config_bytes(&c, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `actual` (offset 4, 32 bits) is the driver's to write.
        if offset == 4 && data.len() == 4 {
            lock(&self.shared).actual_pages = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        }
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let acked = ctx.acked_features;
        let mut queues: Vec<Option<VirtQueue>> =
            ctx.queues.into_iter().zip(ctx.queue_evts).map(|(q, e)| Some(VirtQueue::new(q, e))).collect();
        let mut take = |i: usize| queues.get_mut(i).and_then(Option::take);
        let (Some(inflate), Some(deflate)) = (take(0), take(1)) else {
            return Err(ActivateError::BadQueue { index: 1, reason: "missing".into() });
        };
        let mut next = 2;
        let stats = if acked & features::STATS_VQ != 0 {
            next += 1;
            take(next - 1)
        } else {
            None
        };
        let reporting = if acked & features::REPORTING != 0 { take(next) } else { None };
        let timer = match &stats {
            Some(_) => {
                let mut t = TimerFd::new().map_err(io::Error::from)?;
                let period = Duration::from_secs(u64::from(self.stats_interval.max(1)));
                t.reset(period, Some(period)).map_err(io::Error::from)?;
                Some(t)
            }
            None => None,
        };
        let fds: Vec<_> = [Some(&inflate), Some(&deflate), stats.as_ref(), reporting.as_ref()]
            .into_iter()
            .map(|q| q.map(|q| q.evt.as_raw_fd()))
            .collect();
        let timer_fd = timer.as_ref().map(|t| t.as_raw_fd());
        lock(&self.shared).interrupt = Some(ctx.interrupt.clone());
        let worker = Arc::new(Mutex::new(Worker {
            mem: ctx.mem,
            interrupt: ctx.interrupt,
            inflate,
            deflate,
            stats,
            reporting,
            timer,
            held_stats: None,
            shared: self.shared.clone(),
            active: true,
        }));
        let mut regs = Registrations::new(ctx.event_loop);
        let handlers: [fn(&mut Worker, u32); 4] =
            [|w, _| w.on_inflate(), |w, _| w.on_deflate(), |w, _| w.on_stats(), |w, _| w.on_reporting()];
        for (fd, handler) in fds.into_iter().zip(handlers) {
            if let Some(fd) = fd {
                regs.add(fd, EV_IN, &worker, handler)?;
            }
        }
        if let Some(fd) = timer_fd {
            regs.add(fd, EV_IN, &worker, |w, _| w.on_timer())?;
        }
        {
            let mut w = lock(&worker);
            w.on_inflate();
            w.on_deflate();
            w.on_stats();
            w.on_reporting();
        }
        self.active = Some(Activation::new(worker, regs));
        Ok(())
    }

    fn reset(&mut self) -> bool {
        deactivate(&mut self.active);
        let mut s = lock(&self.shared);
        s.interrupt = None;
        s.actual_pages = 0;
        true
    }
}

struct Worker {
    mem: GuestMemory,
    interrupt: Arc<Interrupt>,
    inflate: VirtQueue,
    deflate: VirtQueue,
    stats: Option<VirtQueue>,
    reporting: Option<VirtQueue>,
    timer: Option<TimerFd>,
    /// The statistics buffer the device holds until the next poll.
    held_stats: Option<u16>,
    shared: Arc<Mutex<Shared>>,
    active: bool,
}

/// Gives the host pages behind `[addr, addr + len)` back, if the range is inside one region.
fn discard_guest_range(mem: &GuestMemory, addr: u64, len: u64) -> bool {
    let Some(region) = mem.find_region(GuestAddress(addr)) else { return false };
    let off = addr - region.start_addr().0;
    if off.checked_add(len).is_none_or(|end| end > region.len()) {
        return false;
    }
    let Ok(ptr) = region.get_host_address(MemoryRegionAddress(off)) else { return false };
    match sys::discard_host_range(ptr, len as usize, region.file_offset().is_some()) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!("virtio-balloon: madvise {addr:#x}+{len:#x}: {e}");
            false
        }
    }
}

impl DeviceWorker for Worker {
    fn stop(&mut self) {
        self.active = false;
    }
}

impl Worker {
    fn running(&self) -> bool {
        self.active && !self.interrupt.needs_reset()
    }

    /// Pops every available chain of `queue` and hands it to `f`; returns chains to the driver
    /// unless `f` keeps them (returns false).
    fn drain(
        &mut self,
        which: fn(&mut Worker) -> Option<&mut VirtQueue>,
        mut f: impl FnMut(&mut Worker, &Chain) -> bool,
    ) {
        if !self.running() {
            return;
        }
        let Some(q) = which(self) else { return };
        q.drain_kick();
        let (mem, interrupt) = (self.mem.clone(), self.interrupt.clone());
        loop {
            let Some(q) = which(self) else { return };
            let Some(chain) = q.pop_or_fail(&mem, "balloon", &interrupt) else { break };
            if f(self, &chain) {
                let Some(q) = which(self) else { return };
                if let Err(e) = q.add_used(&mem, chain.head, 0) {
                    return fail("balloon", &self.interrupt, &e);
                }
            }
        }
        let interrupt = self.interrupt.clone();
        if let Some(q) = which(self) {
            q.notify(&interrupt);
        }
    }

    fn on_inflate(&mut self) {
        self.drain(
            |w| Some(&mut w.inflate),
            |w, chain| {
                let n = (chain.readable_len() as usize / 4).min(MAX_PFNS);
                let mut raw = vec![0u8; n * 4];
                if chain.read_at(&w.mem, 0, &mut raw).is_err() {
                    return true;
                }
                let mut pfns: Vec<u64> =
                    raw.chunks_exact(4).map(|b| u64::from(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))).collect();
                pfns.sort_unstable();
                pfns.dedup();
                // Coalesce runs of contiguous frames into one madvise each.
                let mut i = 0;
                while i < pfns.len() {
                    let mut j = i + 1;
                    while j < pfns.len() && pfns[j] == pfns[j - 1] + 1 {
                        j += 1;
                    }
                    w.discard(pfns[i] * PAGE, (j - i) as u64 * PAGE);
                    i = j;
                }
                true
            },
        );
    }

    fn discard(&mut self, addr: u64, len: u64) {
        if discard_guest_range(&self.mem, addr, len) {
            lock(&self.shared).discarded_pages += len / PAGE;
        } else {
            tracing::debug!("virtio-balloon: range {addr:#x}+{len:#x} is not guest RAM; skipped");
        }
    }

    fn on_deflate(&mut self) {
        self.drain(|w| Some(&mut w.deflate), |_, _| true);
    }

    fn on_stats(&mut self) {
        self.drain(
            |w| w.stats.as_mut(),
            |w, chain| {
                let n = (chain.readable_len() as usize / 10).min(64);
                let mut raw = vec![0u8; n * 10];
                if chain.read_at(&w.mem, 0, &mut raw).is_ok() {
                    let mut s = lock(&w.shared);
                    for e in raw.chunks_exact(10) {
                        let tag = u16::from_le_bytes([e[0], e[1]]);
                        let val = u64::from_le_bytes([e[2], e[3], e[4], e[5], e[6], e[7], e[8], e[9]]);
                        s.stats.set(tag, val);
                    }
                }
                // A second buffer while one is held: return the older one.
                if let Some(old) = w.held_stats.replace(chain.head) {
                    let mem = w.mem.clone();
                    if let Some(q) = w.stats.as_mut() {
                        let _ = q.add_used(&mem, old, 0);
                    }
                }
                false
            },
        );
    }

    /// Statistics period: return the held buffer so the driver refills it.
    fn on_timer(&mut self) {
        if let Some(t) = self.timer.as_mut() {
            let _ = t.wait();
        }
        if !self.running() {
            return;
        }
        let (Some(head), Some(q)) = (self.held_stats.take(), self.stats.as_mut()) else { return };
        match q.add_used(&self.mem, head, 0) {
            Ok(()) => q.notify(&self.interrupt),
            Err(e) => fail("balloon", &self.interrupt, &e),
        }
    }

    fn on_reporting(&mut self) {
        self.drain(
            |w| w.reporting.as_mut(),
            |w, chain| {
                for seg in chain.writable.clone() {
                    // Whole pages only.
                    let start = seg.addr.0.div_ceil(PAGE) * PAGE;
                    let end = (seg.addr.0 + u64::from(seg.len)) / PAGE * PAGE;
                    if end > start {
                        w.discard(start, end - start);
                    }
                }
                true
            },
        );
    }
}

#[cfg(test)]
mod tests;
