//! Descriptor chains, checked before use.
//!
//! `virtio-queue` walks the rings; it ends a chain silently when the chain is broken (a loop, a
//! `next` index past the table, more descriptors than the queue holds, an unreadable descriptor,
//! more than 4 GiB in total). [`pop_chain`] turns that into an error by noticing that the last
//! descriptor it got still had `NEXT` set, and checks that every buffer lies wholly inside guest
//! memory, so device code only ever sees [`Chain`]s of valid guest ranges.

use std::sync::Arc;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use crate::rate_limiter::RateLimiter;
use crate::{GuestMemory, Interrupt};

/// One buffer of a chain: a range of guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Guest physical address.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
}

/// A validated descriptor chain: device-readable buffers first, then device-writable ones.
#[derive(Debug, Clone)]
pub struct Chain {
    /// Head descriptor index (what goes back into the used ring).
    pub head: u16,
    /// Buffers the device reads (driver to device).
    pub readable: Vec<Segment>,
    /// Buffers the device writes (device to driver).
    pub writable: Vec<Segment>,
    /// A readable buffer came after a writable one (the driver broke the ordering rule).
    pub misordered: bool,
}

/// What is wrong with a queue or chain. All of these mean the driver is broken or hostile.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// The available index moved by more than the queue size (or the ring is unreadable).
    #[error("available ring index jumped by more than the queue size, or the ring is unreadable")]
    AvailIndex,
    /// The chain has a loop, a bad `next` index, too many descriptors, an unreadable or bad
    /// indirect table, or more than 4 GiB of buffers.
    #[error("broken descriptor chain at head {head}")]
    Broken {
        /// Head index.
        head: u16,
    },
    /// A buffer is not wholly inside guest memory.
    #[error("descriptor at head {head}: buffer {addr:#x}+{len:#x} is outside guest memory")]
    OutOfMemory {
        /// Head index.
        head: u16,
        /// Buffer address.
        addr: u64,
        /// Buffer length.
        len: u32,
    },
    /// The used ring could not be written.
    #[error("used ring update for head {head} failed")]
    Used {
        /// Head index.
        head: u16,
    },
}

/// Takes the next available chain, or `None` when the driver has offered nothing new.
pub fn pop_chain(queue: &mut Queue, mem: &GuestMemory) -> Result<Option<Chain>, ChainError> {
    let mut iter = queue.iter(mem).map_err(|_| ChainError::AvailIndex)?;
    let Some(desc_chain) = iter.next() else { return Ok(None) };
    let head = desc_chain.head_index();
    let mut chain = Chain { head, readable: Vec::new(), writable: Vec::new(), misordered: false };
    let mut last_had_next = false;
    let mut any = false;
    for d in desc_chain {
        any = true;
        last_had_next = d.has_next();
        let seg = Segment { addr: d.addr(), len: d.len() };
        if seg.len > 0 && !mem.check_range(seg.addr, seg.len as usize) {
            return Err(ChainError::OutOfMemory { head, addr: seg.addr.0, len: seg.len });
        }
        if d.is_write_only() {
            chain.writable.push(seg);
        } else {
            chain.misordered |= !chain.writable.is_empty();
            chain.readable.push(seg);
        }
    }
    if !any || last_had_next {
        return Err(ChainError::Broken { head });
    }
    Ok(Some(chain))
}

impl Chain {
    /// Total bytes the device may read.
    pub fn readable_len(&self) -> u64 {
        self.readable.iter().map(|s| u64::from(s.len)).sum()
    }

    /// Total bytes the device may write.
    pub fn writable_len(&self) -> u64 {
        self.writable.iter().map(|s| u64::from(s.len)).sum()
    }

    /// Reads `buf.len()` bytes starting `offset` bytes into the readable buffers.
    pub fn read_at(&self, mem: &GuestMemory, offset: u64, buf: &mut [u8]) -> Result<(), vm_memory::GuestMemoryError> {
        let mut done = 0;
        for_each_piece(&self.readable, offset, buf.len(), |addr, at, n| {
            mem.read_slice(&mut buf[at..at + n], addr)?;
            done += n;
            Ok(())
        })?;
        short(done, buf.len())
    }

    /// Writes `buf` starting `offset` bytes into the writable buffers.
    pub fn write_at(&self, mem: &GuestMemory, offset: u64, buf: &[u8]) -> Result<(), vm_memory::GuestMemoryError> {
        let mut done = 0;
        for_each_piece(&self.writable, offset, buf.len(), |addr, at, n| {
            mem.write_slice(&buf[at..at + n], addr)?;
            done += n;
            Ok(())
        })?;
        short(done, buf.len())
    }
}

fn short(done: usize, want: usize) -> Result<(), vm_memory::GuestMemoryError> {
    if done == want {
        Ok(())
    } else {
        Err(vm_memory::GuestMemoryError::PartialBuffer { expected: want, completed: done })
    }
}

/// Calls `f(guest address, offset into the caller's buffer, length)` for each piece of the
/// `len` bytes that start `offset` bytes into `segs`.
fn for_each_piece(
    segs: &[Segment],
    mut offset: u64,
    len: usize,
    mut f: impl FnMut(GuestAddress, usize, usize) -> Result<(), vm_memory::GuestMemoryError>,
) -> Result<(), vm_memory::GuestMemoryError> {
    let mut at = 0usize;
    for s in segs {
        if at == len {
            break;
        }
        let slen = u64::from(s.len);
        if offset >= slen {
            offset -= slen;
            continue;
        }
        let n = ((slen - offset) as usize).min(len - at);
        f(GuestAddress(s.addr.0 + offset), at, n)?;
        at += n;
        offset = 0;
    }
    Ok(())
}

/// A queue with its notification EventFd, as a device worker holds it.
pub struct VirtQueue {
    /// The ring state.
    pub queue: Queue,
    /// The EventFd the guest kicks (through KVM's ioeventfd or the transport).
    pub evt: EventFd,
    /// Used entries added since the last interrupt.
    pending_irq: bool,
}

impl VirtQueue {
    /// Wraps a queue and its EventFd.
    pub fn new(queue: Queue, evt: EventFd) -> Self {
        VirtQueue { queue, evt, pending_irq: false }
    }

    /// Consumes the kick counter (a no-op when there was none).
    pub fn drain_kick(&self) {
        let _ = self.evt.read();
    }

    /// See [`pop_chain`].
    pub fn pop(&mut self, mem: &GuestMemory) -> Result<Option<Chain>, ChainError> {
        if !self.queue.ready() {
            return Ok(None);
        }
        pop_chain(&mut self.queue, mem)
    }

    /// [`pop`](Self::pop), declaring the device broken (see [`fail`]) on a queue error.
    pub fn pop_or_fail(&mut self, mem: &GuestMemory, device: &str, interrupt: &Arc<Interrupt>) -> Option<Chain> {
        match self.pop(mem) {
            Ok(c) => c,
            Err(e) => {
                fail(device, interrupt, &e);
                None
            }
        }
    }

    /// [`Self::pop_or_fail`], unless `limiter` is out of tokens: the limiter's timer runs the queue
    /// again once it refills.
    pub fn pop_unless_limited(
        &mut self,
        mem: &GuestMemory,
        limiter: Option<&RateLimiter>,
        device: &str,
        interrupt: &Arc<Interrupt>,
    ) -> Option<Chain> {
        if limiter.is_some_and(|l| l.is_blocked()) {
            return None;
        }
        self.pop_or_fail(mem, device, interrupt)
    }

    /// Charges `cost` to `limiter` for the chain just popped; when the limiter cannot pay, puts the
    /// chain back and returns false. Without a limiter every chain is paid for.
    pub fn charge_or_undo(&mut self, limiter: Option<&mut RateLimiter>, cost: u64) -> bool {
        let paid = limiter.is_none_or(|l| l.consume(cost));
        if !paid {
            self.undo_pop();
        }
        paid
    }

    /// Puts the last popped chain back (it will be popped again).
    pub fn undo_pop(&mut self) {
        self.queue.go_to_previous_position();
    }

    /// Returns a chain to the driver with `len` bytes written.
    pub fn add_used(&mut self, mem: &GuestMemory, head: u16, len: u32) -> Result<(), ChainError> {
        self.queue.add_used(mem, head, len).map_err(|_| ChainError::Used { head })?;
        self.pending_irq = true;
        Ok(())
    }

    /// Raises the used-ring interrupt if anything was returned since the last call.
    pub fn notify(&mut self, interrupt: &Interrupt) {
        if std::mem::take(&mut self.pending_irq) {
            if let Err(e) = interrupt.signal_used_queue() {
                tracing::warn!("virtio: raising interrupt: {e}");
            }
        }
    }
}

/// Marks the device broken after a queue error (see the crate docs).
pub(crate) fn fail(device: &str, interrupt: &Arc<Interrupt>, err: &ChainError) {
    tracing::warn!("virtio-{device}: {err}; device needs reset");
    if let Err(e) = interrupt.set_needs_reset() {
        tracing::warn!("virtio-{device}: raising interrupt: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_span_segments() {
        let segs = [
            Segment { addr: GuestAddress(0x1000), len: 4 },
            Segment { addr: GuestAddress(0x2000), len: 4 },
            Segment { addr: GuestAddress(0x3000), len: 4 },
        ];
        let mut got = Vec::new();
        for_each_piece(&segs, 2, 7, |a, at, n| {
            got.push((a.0, at, n));
            Ok(())
        })
        .unwrap();
        assert_eq!(got, vec![(0x1002, 0, 2), (0x2000, 2, 4), (0x3000, 6, 1)]);
    }

    #[test]
    fn short_chains_report_partial() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let chain = Chain {
            head: 0,
            readable: vec![Segment { addr: GuestAddress(0x100), len: 4 }],
            writable: vec![],
            misordered: false,
        };
        let mut buf = [0u8; 8];
        assert!(chain.read_at(&mem, 0, &mut buf).is_err());
        assert!(chain.read_at(&mem, 0, &mut buf[..4]).is_ok());
        assert!(chain.write_at(&mem, 0, &buf[..1]).is_err());
    }
}
