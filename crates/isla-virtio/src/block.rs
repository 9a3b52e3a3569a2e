//! virtio-blk (virtio 1.x section 5.2) over an `isla-disk` image (raw or qcow2).
//!
//! One request queue. Supported requests: IN, OUT, FLUSH, GET_ID, DISCARD and WRITE_ZEROES (one
//! segment each); anything else gets `VIRTIO_BLK_S_UNSUPP`. A request that is well formed as a
//! chain but wrong as a request (short header, data in the wrong direction, a length that is not
//! whole sectors, a range past the end of the disk, a write to a read-only disk) gets
//! `VIRTIO_BLK_S_IOERR`; so does an I/O error. Data moves through a fixed bounce buffer in
//! [`CHUNK`]-sized pieces, so a request's size never decides how much host memory is allocated.
//! With a rate limiter, each request takes one operation and its data length in bytes.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use isla_disk::{BlockBackend, Format, OpenOptions};
use serde::Deserialize;

use crate::event_loop::{deactivate, Activation, DeviceWorker, Registrations};
use crate::queue::{fail, Chain, VirtQueue};
use crate::rate_limiter::{RateLimiter, RateLimiterConfig};
use crate::{
    lock, read_config_bytes, ActivateContext, ActivateError, DeviceError, GuestMemory, Interrupt, VirtioDevice,
    VIRTIO_F_RING_INDIRECT_DESC, VIRTIO_F_VERSION_1,
};

/// Sector size of the virtio-blk protocol.
pub const SECTOR: u64 = 512;
/// Queue size.
pub const QUEUE_SIZE: u16 = 256;
/// Bounce-buffer size.
pub const CHUNK: usize = 128 << 10;
/// Largest DISCARD / WRITE_ZEROES request, in sectors (advertised in the config space).
pub const MAX_DISCARD_SECTORS: u32 = 1 << 22;

/// Feature bits (virtio 1.x 5.2.3).
pub mod features {
    pub const SEG_MAX: u64 = 1 << 2;
    pub const RO: u64 = 1 << 5;
    pub const BLK_SIZE: u64 = 1 << 6;
    pub const FLUSH: u64 = 1 << 9;
    pub const DISCARD: u64 = 1 << 13;
    pub const WRITE_ZEROES: u64 = 1 << 14;
}

/// Request types.
pub mod req {
    pub const IN: u32 = 0;
    pub const OUT: u32 = 1;
    pub const FLUSH: u32 = 4;
    pub const GET_ID: u32 = 8;
    pub const DISCARD: u32 = 11;
    pub const WRITE_ZEROES: u32 = 13;
}

/// Request status values.
pub const S_OK: u8 = 0;
/// I/O error (also: malformed request).
pub const S_IOERR: u8 = 1;
/// Unsupported request.
pub const S_UNSUPP: u8 = 2;

/// Length of GET_ID's answer.
pub const ID_BYTES: usize = 20;

/// Image formats a config may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    Raw,
    Qcow2,
}

/// A block device's configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockConfig {
    /// The image file.
    pub path: PathBuf,
    /// Refuse writes (the guest sees `VIRTIO_BLK_F_RO`).
    #[serde(default)]
    pub read_only: bool,
    /// Image format; detected when absent. Give it for a disk the guest writes (see
    /// `isla_disk::OpenOptions::format`).
    #[serde(default)]
    pub format: Option<ImageFormat>,
    /// Serial number returned by GET_ID (at most 20 bytes); the file name when absent.
    #[serde(default)]
    pub id: Option<String>,
    /// Rate limits.
    #[serde(default)]
    pub rate_limiter: Option<RateLimiterConfig>,
}

/// The virtio-blk device.
pub struct Block {
    disk: Arc<Mutex<Box<dyn BlockBackend>>>,
    config_space: Vec<u8>,
    features: u64,
    id: [u8; ID_BYTES],
    rate_limiter: Option<RateLimiterConfig>,
    active: Option<Activation<Worker>>,
}

impl Block {
    /// Opens the image.
    pub fn new(cfg: BlockConfig) -> Result<Self, DeviceError> {
        let format = cfg.format.map(|f| match f {
            ImageFormat::Raw => Format::Raw,
            ImageFormat::Qcow2 => Format::Qcow2,
        });
        let disk = isla_disk::open(&cfg.path, OpenOptions { read_only: cfg.read_only, format })
            .map_err(|source| DeviceError::Disk { path: cfg.path.clone(), source })?;
        let id_text = match &cfg.id {
            Some(id) => id.clone(),
            None => cfg.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        };
        if cfg.id.is_some() && id_text.len() > ID_BYTES {
            return Err(DeviceError::Config {
                field: "id",
                reason: format!("`{id_text}` is {} bytes; virtio-blk serials hold at most {ID_BYTES}", id_text.len()),
            });
        }
        let mut id = [0u8; ID_BYTES];
        let n = id_text.len().min(ID_BYTES);
        id[..n].copy_from_slice(&id_text.as_bytes()[..n]);
        let mut features =
            VIRTIO_F_VERSION_1 | VIRTIO_F_RING_INDIRECT_DESC | features::FLUSH | features::BLK_SIZE | features::SEG_MAX;
        if cfg.read_only {
            features |= features::RO;
        } else {
            features |= features::DISCARD | features::WRITE_ZEROES;
        }
        let config_space = config_space(disk.size() / SECTOR);
        Ok(Block {
            disk: Arc::new(Mutex::new(disk)),
            config_space,
            features,
            id,
            rate_limiter: cfg.rate_limiter,
            active: None,
        })
    }

    /// True while the rate limiter holds requests back (for tests and metrics).
    pub fn is_throttled(&self) -> bool {
        self.active.as_ref().is_some_and(|a| lock(&a.worker).limiter.as_ref().is_some_and(|l| l.is_blocked()))
    }
}

/// The 60-byte `virtio_blk_config`.
fn config_space(capacity: u64) -> Vec<u8> {
    let mut c = vec![0u8; 60];
    c[0..8].copy_from_slice(&capacity.to_le_bytes());
    c[12..16].copy_from_slice(&u32::from(QUEUE_SIZE - 2).to_le_bytes()); // seg_max
    c[20..24].copy_from_slice(&(SECTOR as u32).to_le_bytes()); // blk_size
    c[36..40].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes()); // max_discard_sectors
    c[40..44].copy_from_slice(&1u32.to_le_bytes()); // max_discard_seg
    c[44..48].copy_from_slice(&1u32.to_le_bytes()); // discard_sector_alignment
    c[48..52].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes()); // max_write_zeroes_sectors
    c[52..56].copy_from_slice(&1u32.to_le_bytes()); // max_write_zeroes_seg
    c[56] = 1; // write_zeroes_may_unmap
    c
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_space, offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        tracing::debug!("virtio-blk: config write at {offset:#x} ignored");
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let (queue, evt) = ctx
            .queues
            .into_iter()
            .zip(ctx.queue_evts)
            .next()
            .ok_or(ActivateError::BadQueue { index: 0, reason: "missing".into() })?;
        if !virtio_queue::QueueT::ready(&queue) {
            return Err(ActivateError::BadQueue { index: 0, reason: "not enabled".into() });
        }
        let limiter = self.rate_limiter.as_ref().map(RateLimiter::new).transpose()?;
        let worker = Arc::new(Mutex::new(Worker {
            mem: ctx.mem,
            interrupt: ctx.interrupt,
            queue: VirtQueue::new(queue, evt),
            disk: self.disk.clone(),
            id: self.id,
            acked: ctx.acked_features,
            limiter,
            buf: vec![0u8; CHUNK],
            active: true,
        }));
        let mut regs = Registrations::new(ctx.event_loop);
        regs.add_queue(&worker, |w| &mut w.queue, |w| w.limiter.as_mut(), Worker::process)?;
        // Requests made available before DRIVER_OK (or kicks lost before registration).
        lock(&worker).process();
        self.active = Some(Activation::new(worker, regs));
        Ok(())
    }

    fn reset(&mut self) -> bool {
        deactivate(&mut self.active);
        if let Err(e) = lock(&self.disk).flush() {
            tracing::warn!("virtio-blk: flush at reset: {e}");
        }
        true
    }
}

struct Worker {
    mem: GuestMemory,
    interrupt: Arc<Interrupt>,
    queue: VirtQueue,
    disk: Arc<Mutex<Box<dyn BlockBackend>>>,
    id: [u8; ID_BYTES],
    acked: u64,
    limiter: Option<RateLimiter>,
    buf: Vec<u8>,
    active: bool,
}

/// A request as parsed from its chain.
struct Request {
    kind: u32,
    sector: u64,
    /// Bytes of data (device-writable for IN/GET_ID, device-readable otherwise).
    data_len: u64,
    /// Offset of the status byte in the writable buffers.
    status_at: u64,
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
            let Some(chain) = self.queue.pop_unless_limited(&self.mem, limiter, "blk", &self.interrupt) else { break };
            let parsed = self.parse(&chain);
            if let Ok(r) = &parsed {
                let bytes = if matches!(r.kind, req::IN | req::OUT) { r.data_len } else { 0 };
                if !self.queue.charge_or_undo(self.limiter.as_mut(), bytes) {
                    break;
                }
            }
            let used = match parsed {
                Ok(r) => {
                    let (status, written) = self.execute(&chain, &r);
                    if chain.write_at(&self.mem, r.status_at, &[status]).is_err() {
                        0
                    } else {
                        written + 1
                    }
                }
                Err(Some(status_at)) => {
                    if chain.write_at(&self.mem, status_at, &[S_IOERR]).is_ok() {
                        1
                    } else {
                        0
                    }
                }
                // No status byte to write: the chain goes back untouched.
                Err(None) => 0,
            };
            if let Err(e) = self.queue.add_used(&self.mem, chain.head, used) {
                fail("blk", &self.interrupt, &e);
                break;
            }
        }
        self.queue.notify(&self.interrupt);
    }

    /// Parses a chain; on error, where the IOERR status goes (if anywhere).
    fn parse(&self, chain: &Chain) -> Result<Request, Option<u64>> {
        let wlen = chain.writable_len();
        let status_at = match chain.writable.last() {
            Some(s) if s.len > 0 => wlen - 1,
            _ => return Err(None),
        };
        let rlen = chain.readable_len();
        if chain.misordered || rlen < 16 {
            return Err(Some(status_at));
        }
        let mut hdr = [0u8; 16];
        chain.read_at(&self.mem, 0, &mut hdr).map_err(|_| Some(status_at))?;
        let kind = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        let sector = u64::from_le_bytes([hdr[8], hdr[9], hdr[10], hdr[11], hdr[12], hdr[13], hdr[14], hdr[15]]);
        let (in_len, out_len) = (wlen - 1, rlen - 16);
        let data_len = match kind {
            // Data only towards the driver, in whole sectors.
            req::IN if out_len == 0 && in_len % SECTOR == 0 => in_len,
            req::GET_ID if out_len == 0 => in_len,
            // Data only towards the device.
            req::OUT if in_len == 0 && out_len % SECTOR == 0 => out_len,
            req::DISCARD | req::WRITE_ZEROES if in_len == 0 => out_len,
            req::FLUSH if in_len == 0 && out_len == 0 => 0,
            req::IN | req::OUT | req::GET_ID | req::DISCARD | req::WRITE_ZEROES | req::FLUSH => {
                return Err(Some(status_at))
            }
            _ => 0,
        };
        Ok(Request { kind, sector, data_len, status_at })
    }

    /// Runs a request: (status, bytes written to the driver before the status byte).
    fn execute(&mut self, chain: &Chain, r: &Request) -> (u8, u32) {
        let result = match r.kind {
            req::IN => self.transfer(chain, r, false).map(|()| r.data_len as u32),
            req::OUT => self.transfer(chain, r, true).map(|()| 0),
            req::FLUSH if self.acked & features::FLUSH != 0 => {
                lock(&self.disk).flush().map(|()| 0).map_err(|e| tracing::warn!("virtio-blk: flush: {e}"))
            }
            req::GET_ID => {
                let n = (r.data_len as usize).min(ID_BYTES);
                chain.write_at(&self.mem, 0, &self.id[..n]).map(|()| n as u32).map_err(|_| ())
            }
            req::DISCARD if self.acked & features::DISCARD != 0 => self.discard(chain, r, false).map(|()| 0),
            req::WRITE_ZEROES if self.acked & features::WRITE_ZEROES != 0 => self.discard(chain, r, true).map(|()| 0),
            _ => return (S_UNSUPP, 0),
        };
        match result {
            Ok(n) => (S_OK, n),
            Err(()) => (S_IOERR, 0),
        }
    }

    /// Byte range of `sectors` sectors from `sector`, if inside the disk.
    fn range(&self, sector: u64, bytes: u64) -> Result<u64, ()> {
        let start = sector.checked_mul(SECTOR).ok_or(())?;
        let end = start.checked_add(bytes).ok_or(())?;
        if end > lock(&self.disk).size() / SECTOR * SECTOR {
            tracing::debug!("virtio-blk: request {start:#x}+{bytes:#x} past the end of the disk");
            return Err(());
        }
        Ok(start)
    }

    fn transfer(&mut self, chain: &Chain, r: &Request, write: bool) -> Result<(), ()> {
        let start = self.range(r.sector, r.data_len)?;
        let mut disk = lock(&self.disk);
        let mut done = 0u64;
        while done < r.data_len {
            let n = (r.data_len - done).min(CHUNK as u64) as usize;
            let buf = &mut self.buf[..n];
            if write {
                chain.read_at(&self.mem, 16 + done, buf).map_err(|_| ())?;
                disk.write_at(buf, start + done).map_err(|e| tracing::warn!("virtio-blk: write: {e}"))?;
            } else {
                disk.read_at(buf, start + done).map_err(|e| tracing::warn!("virtio-blk: read: {e}"))?;
                chain.write_at(&self.mem, done, buf).map_err(|_| ())?;
            }
            done += n as u64;
        }
        Ok(())
    }

    /// DISCARD or WRITE_ZEROES with one `virtio_blk_discard_write_zeroes` segment.
    fn discard(&mut self, chain: &Chain, r: &Request, zeroes: bool) -> Result<(), ()> {
        if r.data_len != 16 {
            tracing::debug!("virtio-blk: {} bytes of discard segments (one segment is supported)", r.data_len);
            return Err(());
        }
        let mut seg = [0u8; 16];
        chain.read_at(&self.mem, 16, &mut seg).map_err(|_| ())?;
        let sector = u64::from_le_bytes([seg[0], seg[1], seg[2], seg[3], seg[4], seg[5], seg[6], seg[7]]);
        let sectors = u32::from_le_bytes([seg[8], seg[9], seg[10], seg[11]]);
        let flags = u32::from_le_bytes([seg[12], seg[13], seg[14], seg[15]]);
        // Only WRITE_ZEROES has a flag (bit 0, UNMAP); reserved bits must be zero.
        if sectors > MAX_DISCARD_SECTORS || flags & !u32::from(zeroes) != 0 {
            return Err(());
        }
        let len = u64::from(sectors) * SECTOR;
        let start = self.range(sector, len)?;
        let mut disk = lock(&self.disk);
        let res = if zeroes { disk.write_zeroes(start, len) } else { disk.discard(start, len) };
        res.map_err(|e| tracing::warn!("virtio-blk: discard/write-zeroes: {e}"))
    }
}

#[cfg(test)]
mod tests;
