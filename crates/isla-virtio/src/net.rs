//! virtio-net (virtio 1.x section 5.1) on a TAP interface.
//!
//! Queues: receive (0) and transmit (1); no control queue, one queue pair. The 12-byte
//! `virtio_net_hdr_v1` passes unchanged between the guest and the TAP (opened with
//! `IFF_VNET_HDR`), so checksum and segmentation offloads the guest negotiates are carried out
//! by the host kernel: `TUNSETOFFLOAD` is set at activation from the guest's `GUEST_*` features,
//! and the TAP accepts `HOST_*` offloaded frames as they come.
//!
//! Transmit gathers a chain's readable buffers into one frame and writes it to the TAP; chains
//! with device-writable buffers, or shorter than the header, or longer than [`MAX_FRAME`], are
//! returned unsent. Receive reads a frame from the TAP (edge-triggered, until `EAGAIN`) and
//! copies it into one chain, or with `MRG_RXBUF` into as many chains as it needs, setting
//! `num_buffers`; when the guest has posted no (or too few) buffers the frame waits in the device
//! until the guest kicks the receive queue. A frame too big for a single chain without
//! `MRG_RXBUF` is dropped. Frames move through one copy (TAP <-> bounce buffer <-> guest), so no
//! host pointer into guest memory is ever handed to a system call.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use serde::Deserialize;

use crate::event_loop::{deactivate, Activation, DeviceWorker, Registrations, EV_EDGE, EV_IN};
use crate::queue::{fail, VirtQueue};
use crate::rate_limiter::{RateLimiter, RateLimiterConfig};
use crate::tap::{Tap, VNET_HDR_LEN};
use crate::{
    lock, read_config_bytes, ActivateContext, ActivateError, DeviceError, GuestMemory, Interrupt, VirtioDevice,
    VIRTIO_F_RING_INDIRECT_DESC, VIRTIO_F_VERSION_1,
};

/// Queue size (both queues).
pub const QUEUE_SIZE: u16 = 256;
/// Largest frame with its header: 64 KiB of GSO payload plus Ethernet and VLAN headers.
pub const MAX_FRAME: usize = VNET_HDR_LEN + 65550;

/// Feature bits (virtio 1.x 5.1.3).
pub mod features {
    pub const CSUM: u64 = 1 << 0;
    pub const GUEST_CSUM: u64 = 1 << 1;
    pub const MAC: u64 = 1 << 5;
    pub const GUEST_TSO4: u64 = 1 << 7;
    pub const GUEST_TSO6: u64 = 1 << 8;
    pub const GUEST_ECN: u64 = 1 << 9;
    pub const GUEST_UFO: u64 = 1 << 10;
    pub const HOST_TSO4: u64 = 1 << 11;
    pub const HOST_TSO6: u64 = 1 << 12;
    pub const HOST_ECN: u64 = 1 << 13;
    pub const HOST_UFO: u64 = 1 << 14;
    pub const MRG_RXBUF: u64 = 1 << 15;
}

/// A network interface's configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// TAP interface to create or attach to (in the namespace of the thread calling `Net::new`).
    pub tap_name: String,
    /// The guest's MAC address; without it the guest picks a random one.
    #[serde(default)]
    pub mac: Option<[u8; 6]>,
    /// Limits on frames from the TAP to the guest.
    #[serde(default)]
    pub rx_rate_limiter: Option<RateLimiterConfig>,
    /// Limits on frames from the guest to the TAP.
    #[serde(default)]
    pub tx_rate_limiter: Option<RateLimiterConfig>,
}

/// The virtio-net device.
pub struct Net {
    cfg: NetConfig,
    tap: Arc<Tap>,
    features: u64,
    config_space: [u8; 6],
    active: Option<Activation<Worker>>,
}

impl Net {
    /// Opens the TAP named in the config.
    pub fn new(cfg: NetConfig) -> Result<Self, DeviceError> {
        let tap = Tap::open(&cfg.tap_name).map_err(DeviceError::host(format!("tap_name `{}`", cfg.tap_name)))?;
        Ok(Self::with_tap(cfg, tap))
    }

    /// Uses an already open TAP (`cfg.tap_name` is then only informative).
    pub fn with_tap(cfg: NetConfig, tap: Tap) -> Self {
        let mut features = VIRTIO_F_VERSION_1
            | VIRTIO_F_RING_INDIRECT_DESC
            | features::CSUM
            | features::GUEST_CSUM
            | features::GUEST_TSO4
            | features::GUEST_TSO6
            | features::GUEST_ECN
            | features::GUEST_UFO
            | features::HOST_TSO4
            | features::HOST_TSO6
            | features::HOST_ECN
            | features::HOST_UFO
            | features::MRG_RXBUF;
        let mut config_space = [0u8; 6];
        if let Some(mac) = cfg.mac {
            features |= features::MAC;
            config_space = mac;
        }
        Net { cfg, tap: Arc::new(tap), features, config_space, active: None }
    }

    /// The TAP interface's name.
    pub fn tap_name(&self) -> &str {
        self.tap.name()
    }
}

/// `TUN_F_*` offloads for the guest's accepted features.
fn tap_offloads(acked: u64) -> u32 {
    if acked & features::GUEST_CSUM == 0 {
        return 0;
    }
    let mut f = libc::TUN_F_CSUM;
    for (feature, flag) in [
        (features::GUEST_TSO4, libc::TUN_F_TSO4),
        (features::GUEST_TSO6, libc::TUN_F_TSO6),
        (features::GUEST_ECN, libc::TUN_F_TSO_ECN),
        (features::GUEST_UFO, libc::TUN_F_UFO),
    ] {
        if acked & feature != 0 {
            f |= flag;
        }
    }
    f
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        virtio_bindings::virtio_ids::VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_space, offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        tracing::debug!("virtio-net: config write at {offset:#x} ignored");
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let mut pairs = ctx.queues.into_iter().zip(ctx.queue_evts);
        let (Some((rxq, rxe)), Some((txq, txe))) = (pairs.next(), pairs.next()) else {
            return Err(ActivateError::BadQueue { index: 1, reason: "missing".into() });
        };
        self.tap.set_offload(tap_offloads(ctx.acked_features))?;
        let rx_limiter = self.cfg.rx_rate_limiter.as_ref().map(RateLimiter::new).transpose()?;
        let tx_limiter = self.cfg.tx_rate_limiter.as_ref().map(RateLimiter::new).transpose()?;
        let worker = Arc::new(Mutex::new(Worker {
            mem: ctx.mem,
            interrupt: ctx.interrupt,
            rx: VirtQueue::new(rxq, rxe),
            tx: VirtQueue::new(txq, txe),
            tap: self.tap.clone(),
            mrg_rxbuf: ctx.acked_features & features::MRG_RXBUF != 0,
            rx_frame: vec![0u8; MAX_FRAME],
            rx_pending: None,
            tx_frame: vec![0u8; MAX_FRAME],
            rx_limiter,
            tx_limiter,
            active: true,
            stats: NetStats::default(),
        }));
        let mut regs = Registrations::new(ctx.event_loop);
        regs.add(self.tap.as_raw_fd(), EV_IN | EV_EDGE, &worker, |w, _| w.process_rx())?;
        regs.add_queue(&worker, |w| &mut w.rx, |w| w.rx_limiter.as_mut(), Worker::process_rx)?;
        regs.add_queue(&worker, |w| &mut w.tx, |w| w.tx_limiter.as_mut(), Worker::process_tx)?;
        {
            let mut w = lock(&worker);
            w.process_tx();
            w.process_rx();
        }
        self.active = Some(Activation::new(worker, regs));
        Ok(())
    }

    fn reset(&mut self) -> bool {
        deactivate(&mut self.active);
        true
    }
}

/// Frame counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Frames delivered to the guest.
    pub rx_frames: u64,
    /// Frames from the TAP dropped (too big for the guest's buffers).
    pub rx_dropped: u64,
    /// Frames sent to the TAP.
    pub tx_frames: u64,
    /// Guest frames not sent (malformed chain, TAP error).
    pub tx_dropped: u64,
}

impl Net {
    /// Frame counters of the current activation.
    pub fn stats(&self) -> NetStats {
        self.active.as_ref().map(|a| lock(&a.worker).stats).unwrap_or_default()
    }
}

struct Worker {
    mem: GuestMemory,
    interrupt: Arc<Interrupt>,
    rx: VirtQueue,
    tx: VirtQueue,
    tap: Arc<Tap>,
    mrg_rxbuf: bool,
    rx_frame: Vec<u8>,
    /// Length of a frame read from the TAP and not yet delivered, and whether its tokens were
    /// taken.
    rx_pending: Option<(usize, bool)>,
    tx_frame: Vec<u8>,
    rx_limiter: Option<RateLimiter>,
    tx_limiter: Option<RateLimiter>,
    active: bool,
    stats: NetStats,
}

/// What happened to a frame offered to the guest.
enum Delivery {
    Done,
    NoBuffers,
    Failed,
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

    fn process_rx(&mut self) {
        if !self.running() {
            return;
        }
        loop {
            let (len, paid) = match self.rx_pending {
                Some(p) => p,
                None => match self.tap.read_frame(&mut self.rx_frame) {
                    Ok(n) if n > VNET_HDR_LEN => (n, false),
                    Ok(_) => continue,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        tracing::warn!("virtio-net: reading {}: {e}", self.tap.name());
                        break;
                    }
                },
            };
            self.rx_pending = Some((len, paid));
            if !paid {
                if let Some(l) = self.rx_limiter.as_mut() {
                    if !l.consume((len - VNET_HDR_LEN) as u64) {
                        break;
                    }
                }
                self.rx_pending = Some((len, true));
            }
            match self.deliver(len) {
                Delivery::Done => self.rx_pending = None,
                Delivery::NoBuffers => break,
                Delivery::Failed => break,
            }
        }
        self.rx.notify(&self.interrupt);
    }

    /// Copies the pending frame into the receive queue.
    fn deliver(&mut self, len: usize) -> Delivery {
        let mut used: Vec<(u16, u32)> = Vec::new();
        let mut chains = Vec::new();
        let mut room = 0usize;
        while room < len {
            if !self.mrg_rxbuf && !chains.is_empty() {
                break;
            }
            match self.rx.pop(&self.mem) {
                Ok(Some(c)) => {
                    room += c.writable_len().min(len as u64) as usize;
                    chains.push(c);
                }
                Ok(None) => {
                    for _ in &chains {
                        self.rx.undo_pop();
                    }
                    return Delivery::NoBuffers;
                }
                Err(e) => {
                    fail("net", &self.interrupt, &e);
                    return Delivery::Failed;
                }
            }
        }
        if room < len {
            // Without MRG_RXBUF one chain must hold the frame: drop the frame, keep the chain.
            self.rx.undo_pop();
            self.stats.rx_dropped += 1;
            tracing::debug!("virtio-net: {len}-byte frame does not fit a receive buffer; dropped");
            return Delivery::Done;
        }
        let num_buffers = chains.len() as u16;
        self.rx_frame[10..12].copy_from_slice(&num_buffers.to_le_bytes());
        let mut at = 0usize;
        for c in &chains {
            let n = (c.writable_len() as usize).min(len - at);
            if c.write_at(&self.mem, 0, &self.rx_frame[at..at + n]).is_err() {
                // Validated ranges cannot fail; treat it as a broken queue all the same.
                fail("net", &self.interrupt, &crate::queue::ChainError::Used { head: c.head });
                return Delivery::Failed;
            }
            used.push((c.head, n as u32));
            at += n;
        }
        for (head, n) in used {
            if let Err(e) = self.rx.add_used(&self.mem, head, n) {
                fail("net", &self.interrupt, &e);
                return Delivery::Failed;
            }
        }
        self.stats.rx_frames += 1;
        Delivery::Done
    }

    fn process_tx(&mut self) {
        if !self.running() {
            return;
        }
        loop {
            let limiter = self.tx_limiter.as_ref();
            let Some(chain) = self.tx.pop_unless_limited(&self.mem, limiter, "net", &self.interrupt) else { break };
            let len = chain.readable_len() as usize;
            let well_formed = chain.writable.is_empty() && len > VNET_HDR_LEN && len <= MAX_FRAME;
            if well_formed && !self.tx.charge_or_undo(self.tx_limiter.as_mut(), (len - VNET_HDR_LEN) as u64) {
                break;
            }
            let sent = well_formed
                && chain.read_at(&self.mem, 0, &mut self.tx_frame[..len]).is_ok()
                && match self.tap.write_frame(&self.tx_frame[..len]) {
                    Ok(_) => true,
                    Err(e) => {
                        tracing::debug!("virtio-net: writing {}: {e}", self.tap.name());
                        false
                    }
                };
            if sent {
                self.stats.tx_frames += 1;
            } else {
                self.stats.tx_dropped += 1;
            }
            if let Err(e) = self.tx.add_used(&self.mem, chain.head, 0) {
                fail("net", &self.interrupt, &e);
                break;
            }
        }
        self.tx.notify(&self.interrupt);
    }
}

#[cfg(test)]
mod tests;
