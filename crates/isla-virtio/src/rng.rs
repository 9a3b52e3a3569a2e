//! virtio-rng (virtio 1.x section 5.4): the host's entropy through `getrandom(2)`.
//!
//! One queue of device-writable buffers; each is filled with up to [`MAX_FILL`] random bytes (the
//! guest's hwrng core asks for small amounts; the cap keeps one request from costing much). A
//! chain with readable buffers is answered with zero bytes written. With a rate limiter, each
//! chain takes one operation and the bytes it will receive.

use std::sync::{Arc, Mutex};

use serde::Deserialize;

use crate::event_loop::{deactivate, Activation, DeviceWorker, Registrations};
use crate::queue::{fail, VirtQueue};
use crate::rate_limiter::{RateLimiter, RateLimiterConfig};
use crate::{lock, ActivateContext, ActivateError, GuestMemory, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};

/// Queue size.
pub const QUEUE_SIZE: u16 = 256;
/// Most bytes given per request.
pub const MAX_FILL: usize = 64 << 10;

/// The entropy device's configuration.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RngConfig {
    /// Rate limits.
    #[serde(default)]
    pub rate_limiter: Option<RateLimiterConfig>,
}

/// The virtio-rng device.
pub struct Rng {
    cfg: RngConfig,
    active: Option<Activation<Worker>>,
}

impl Rng {
    /// Creates the device.
    pub fn new(cfg: RngConfig) -> Self {
        Rng { cfg, active: None }
    }

    /// True while the rate limiter holds requests back (waits for a running batch to finish).
    pub fn is_throttled(&self) -> bool {
        self.active.as_ref().is_some_and(|a| lock(&a.worker).limiter.as_ref().is_some_and(|l| l.is_blocked()))
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        virtio_bindings::virtio_ids::VIRTIO_ID_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let (queue, evt) = ctx
            .queues
            .into_iter()
            .zip(ctx.queue_evts)
            .next()
            .ok_or(ActivateError::BadQueue { index: 0, reason: "missing".into() })?;
        let limiter = self.cfg.rate_limiter.as_ref().map(RateLimiter::new).transpose()?;
        let worker = Arc::new(Mutex::new(Worker {
            mem: ctx.mem,
            interrupt: ctx.interrupt,
            queue: VirtQueue::new(queue, evt),
            limiter,
            buf: vec![0u8; MAX_FILL],
            active: true,
        }));
        let mut regs = Registrations::new(ctx.event_loop);
        regs.add_queue(&worker, |w| &mut w.queue, |w| w.limiter.as_mut(), Worker::process)?;
        lock(&worker).process();
        self.active = Some(Activation::new(worker, regs));
        Ok(())
    }

    fn reset(&mut self) -> bool {
        deactivate(&mut self.active);
        true
    }
}

struct Worker {
    mem: GuestMemory,
    interrupt: Arc<Interrupt>,
    queue: VirtQueue,
    limiter: Option<RateLimiter>,
    buf: Vec<u8>,
    active: bool,
}

impl DeviceWorker for Worker {
    fn stop(&mut self) {
        self.active = false;
    }
}

impl Worker {
    fn process(&mut self) {
        if !self.active || self.interrupt.needs_reset() {
            return;
        }
        loop {
            let limiter = self.limiter.as_ref();
            let Some(chain) = self.queue.pop_unless_limited(&self.mem, limiter, "rng", &self.interrupt) else { break };
            let n = if chain.readable.is_empty() { chain.writable_len().min(MAX_FILL as u64) as usize } else { 0 };
            if !self.queue.charge_or_undo(self.limiter.as_mut(), n as u64) {
                break;
            }
            let mut written = 0u32;
            if n > 0 {
                match rustix::rand::getrandom(&mut self.buf[..n], rustix::rand::GetRandomFlags::empty()) {
                    Ok(got) if chain.write_at(&self.mem, 0, &self.buf[..got]).is_ok() => written = got as u32,
                    Ok(_) => {}
                    Err(e) => tracing::warn!("virtio-rng: getrandom: {e}"),
                }
            }
            if let Err(e) = self.queue.add_used(&self.mem, chain.head, written) {
                fail("rng", &self.interrupt, &e);
                break;
            }
        }
        self.queue.notify(&self.interrupt);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::TestGuest;

    #[test]
    fn fills_buffers_with_entropy() {
        let dev = Arc::new(Mutex::new(Rng::new(RngConfig::default())));
        let mut g = TestGuest::new(dev);
        g.init(VIRTIO_F_VERSION_1, &[16]);
        let a = g.alloc(64);
        let b = g.alloc(64);
        g.add_chain(0, &[(a, 32, true), (b, 64, true)]);
        g.kick(0);
        let used = g.wait_used(0, 1);
        assert_eq!(used, vec![(0, 96)]);
        let bytes = [g.read(a, 32), g.read(b, 64)].concat();
        assert!(bytes.iter().filter(|&&x| x == 0).count() < 16, "96 random bytes are not mostly zeros");
        // A readable buffer gets nothing.
        let c = g.alloc(8);
        g.add_chain(0, &[(c, 8, false)]);
        g.kick(0);
        assert_eq!(g.wait_used(0, 1)[0].1, 0);
        assert!(g.outside_untouched());
    }

    #[test]
    fn rate_limited_requests_wait_for_tokens() {
        let cfg = RngConfig {
            rate_limiter: Some(RateLimiterConfig {
                bandwidth: Some(crate::rate_limiter::TokenBucketConfig {
                    size: 100,
                    one_time_burst: 0,
                    refill_time_ms: 3_600_000,
                }),
                ops: None,
            }),
        };
        let rng = Arc::new(Mutex::new(Rng::new(cfg)));
        let mut g = TestGuest::new(rng.clone());
        g.init(VIRTIO_F_VERSION_1, &[16]);
        for _ in 0..3 {
            let a = g.alloc(40);
            g.add_chain(0, &[(a, 40, true)]);
        }
        g.kick(0);
        // 100 bytes per hour: two 40-byte requests now, the third waits.
        assert_eq!(g.wait_used(0, 2).len(), 2);
        assert!(rng.lock().unwrap().is_throttled());
        g.kick(0);
        assert!(rng.lock().unwrap().is_throttled());
        assert!(g.take_used(0).is_empty());
    }
}
