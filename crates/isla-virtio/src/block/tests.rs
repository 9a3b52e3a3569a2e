use std::path::Path;

use isla_disk::CreateOptions;

use super::*;
use crate::mmio::status;
use crate::testing::{TestGuest, DESC_NEXT, DESC_WRITE, MEM_SIZE};
use crate::INT_CONFIG;

const ALL: u64 = u64::MAX;

fn image(dir: &Path, format: Format, size: u64) -> PathBuf {
    let path = dir.join(format!("disk.{format}"));
    isla_disk::create(&path, &CreateOptions::new(format, size)).unwrap();
    path
}

fn device(path: &Path, read_only: bool) -> Arc<Mutex<Block>> {
    let cfg = BlockConfig { path: path.into(), read_only, format: None, id: None, rate_limiter: None };
    Arc::new(Mutex::new(Block::new(cfg).unwrap()))
}

fn guest(dev: Arc<Mutex<Block>>) -> TestGuest {
    let mut g = TestGuest::new(dev);
    let s = g.init(ALL, &[16]);
    assert_eq!(s & status::DRIVER_OK, status::DRIVER_OK);
    g
}

fn header(g: &mut TestGuest, kind: u32, sector: u64) -> u64 {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&kind.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    g.alloc_with(&h)
}

/// Submits one request and waits for it: (status byte, used length).
fn submit(g: &mut TestGuest, kind: u32, sector: u64, out: &[u8], in_len: u32) -> (u8, u32, Vec<u8>) {
    let h = header(g, kind, sector);
    let mut bufs = vec![(h, 16, false)];
    if !out.is_empty() {
        // Split the data over two descriptors to exercise gathering.
        let half = out.len() / 2;
        bufs.push((g.alloc_with(&out[..half]), half as u32, false));
        bufs.push((g.alloc_with(&out[half..]), (out.len() - half) as u32, false));
    }
    let data = g.alloc(in_len as usize);
    if in_len > 0 {
        bufs.push((data, in_len, true));
    }
    let st = g.alloc(1);
    g.write(st, &[0xff]);
    bufs.push((st, 1, true));
    g.add_chain(0, &bufs);
    g.kick(0);
    let used = g.wait_used(0, 1);
    (g.read(st, 1)[0], used[0].1, g.read(data, in_len as usize))
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

fn roundtrip(format: Format) {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), format, 1 << 20);
    let dev = device(&path, false);
    let mut g = guest(dev.clone());
    let cap = u64::from_le_bytes(g.read_config(0, 8).try_into().unwrap());
    assert_eq!(cap, (1 << 20) / 512);
    let data = pattern(3 * 512, 7);
    let (st, len, _) = submit(&mut g, req::OUT, 2, &data, 0);
    assert_eq!((st, len), (S_OK, 1));
    let (st, len, back) = submit(&mut g, req::IN, 2, &[], 3 * 512);
    assert_eq!((st, len), (S_OK, 3 * 512 + 1));
    assert_eq!(back, data);
    // A request larger than the bounce buffer is done in pieces.
    let big = pattern(CHUNK + 4096, 3);
    assert_eq!(submit(&mut g, req::OUT, 100, &big, 0).0, S_OK);
    let (st, _, back) = submit(&mut g, req::IN, 100, &[], big.len() as u32);
    assert_eq!(st, S_OK);
    assert!(back == big);
    assert_eq!(submit(&mut g, req::FLUSH, 0, &[], 0).0, S_OK);
    assert!(g.outside_untouched());
    drop(g);
    drop(dev);
    // The bytes are in the image.
    let mut disk = isla_disk::open(&path, OpenOptions { read_only: true, format: Some(format) }).unwrap();
    let mut buf = vec![0u8; data.len()];
    disk.read_at(&mut buf, 1024).unwrap();
    assert_eq!(buf, data);
}

#[test]
fn raw_write_then_read() {
    roundtrip(Format::Raw);
}

#[test]
fn qcow2_write_then_read() {
    roundtrip(Format::Qcow2);
}

#[test]
fn qcow2_image_passes_qemu_img_check() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), Format::Qcow2, 4 << 20);
    let dev = device(&path, false);
    let mut g = guest(dev.clone());
    for i in 0..4u64 {
        assert_eq!(submit(&mut g, req::OUT, i * 200, &pattern(4096, i as u8), 0).0, S_OK);
    }
    drop(g);
    drop(dev);
    match std::process::Command::new("qemu-img").args(["check", "-f", "qcow2"]).arg(&path).output() {
        Ok(out) => assert!(out.status.success(), "qemu-img check: {}", String::from_utf8_lossy(&out.stdout)),
        Err(e) => panic!("qemu-img (package qemu-utils) is needed: {e}"),
    }
}

#[test]
fn get_id_discard_and_write_zeroes() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), Format::Raw, 1 << 20);
    let cfg = BlockConfig {
        path: path.clone(),
        read_only: false,
        format: Some(ImageFormat::Raw),
        id: Some("isla-disk-0".into()),
        rate_limiter: None,
    };
    let mut g = guest(Arc::new(Mutex::new(Block::new(cfg).unwrap())));
    let (st, len, id) = submit(&mut g, req::GET_ID, 0, &[], 20);
    assert_eq!((st, len), (S_OK, 21));
    assert_eq!(&id[..11], b"isla-disk-0");
    assert!(id[11..].iter().all(|&b| b == 0));

    let data = pattern(8 * 512, 1);
    assert_eq!(submit(&mut g, req::OUT, 8, &data, 0).0, S_OK);
    let mut seg = [0u8; 16];
    seg[0..8].copy_from_slice(&8u64.to_le_bytes());
    seg[8..12].copy_from_slice(&4u32.to_le_bytes());
    assert_eq!(submit(&mut g, req::DISCARD, 0, &seg, 0).0, S_OK);
    let (_, _, back) = submit(&mut g, req::IN, 8, &[], 8 * 512);
    assert!(back[..4 * 512].iter().all(|&b| b == 0), "discarded sectors read as zeros");
    assert_eq!(back[4 * 512..], data[4 * 512..]);
    // WRITE_ZEROES with UNMAP over the rest.
    seg[0..8].copy_from_slice(&12u64.to_le_bytes());
    seg[12..16].copy_from_slice(&1u32.to_le_bytes());
    assert_eq!(submit(&mut g, req::WRITE_ZEROES, 0, &seg, 0).0, S_OK);
    let (_, _, back) = submit(&mut g, req::IN, 8, &[], 8 * 512);
    assert!(back.iter().all(|&b| b == 0));
    // Discard with a flag set, or past the end, is an error.
    assert_eq!(submit(&mut g, req::DISCARD, 0, &seg, 0).0, S_IOERR);
    seg[0..8].copy_from_slice(&2047u64.to_le_bytes());
    seg[12..16].copy_from_slice(&0u32.to_le_bytes());
    assert_eq!(submit(&mut g, req::DISCARD, 0, &seg, 0).0, S_IOERR);
}

#[test]
fn read_only_disks_refuse_writes() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), Format::Raw, 1 << 20);
    let mut g = guest(device(&path, true));
    let f = g.device_features();
    assert_ne!(f & features::RO, 0);
    assert_eq!(f & (features::DISCARD | features::WRITE_ZEROES), 0);
    assert_eq!(submit(&mut g, req::OUT, 0, &pattern(512, 0), 0).0, S_IOERR);
    assert_eq!(submit(&mut g, req::IN, 0, &[], 512).0, S_OK);
}

#[test]
fn bad_requests_get_error_statuses() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), Format::Raw, 1 << 20);
    let mut g = guest(device(&path, false));
    // Past the end, overflowing sector numbers, partial sectors.
    assert_eq!(submit(&mut g, req::IN, 2047, &[], 1024).0, S_IOERR);
    assert_eq!(submit(&mut g, req::IN, u64::MAX / 2, &[], 512).0, S_IOERR);
    assert_eq!(submit(&mut g, req::IN, 0, &[], 100).0, S_IOERR);
    // Unknown type.
    assert_eq!(submit(&mut g, 77, 0, &[], 0).0, S_UNSUPP);
    // IN with device-readable data (wrong direction).
    assert_eq!(submit(&mut g, req::IN, 0, &pattern(512, 0), 512).0, S_IOERR);
    // OUT with device-writable data (wrong direction).
    assert_eq!(submit(&mut g, req::OUT, 0, &pattern(512, 0), 512).0, S_IOERR);
    // Header in a device-writable buffer: no header to read.
    let h = g.alloc(16);
    let st = g.alloc(1);
    g.add_chain(0, &[(h, 16, true), (st, 1, true)]);
    g.kick(0);
    assert_eq!(g.wait_used(0, 1)[0].1, 1);
    assert_eq!(g.read(st, 1)[0], S_IOERR);
    // Status in a device-readable buffer: nothing can be reported, the chain comes back empty.
    let h = header(&mut g, req::IN, 0);
    let st = g.alloc(1);
    g.add_chain(0, &[(h, 16, false), (st, 1, false)]);
    g.kick(0);
    assert_eq!(g.wait_used(0, 1)[0].1, 0);
    // Readable after writable.
    let h = header(&mut g, req::FLUSH, 0);
    let st = g.alloc(1);
    let extra = g.alloc(16);
    g.add_chain(0, &[(st, 1, true), (h, 16, false), (extra, 1, true)]);
    g.kick(0);
    g.wait_used(0, 1);
    assert_eq!(g.read(extra, 1)[0], S_IOERR);
    // None of that broke the device.
    assert_eq!(g.status() & status::NEEDS_RESET, 0);
    assert_eq!(submit(&mut g, req::IN, 0, &[], 512).0, S_OK);
    assert!(g.outside_untouched());
}

#[test]
fn rate_limiter_holds_requests_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), Format::Raw, 1 << 20);
    let bucket = crate::rate_limiter::TokenBucketConfig { size: 2, one_time_burst: 1, refill_time_ms: 3_600_000 };
    let cfg = BlockConfig {
        path,
        read_only: false,
        format: None,
        id: None,
        rate_limiter: Some(RateLimiterConfig { bandwidth: None, ops: Some(bucket) }),
    };
    let dev = Arc::new(Mutex::new(Block::new(cfg).unwrap()));
    let mut g = guest(dev.clone());
    for i in 0..5 {
        let h = header(&mut g, req::IN, i);
        let d = g.alloc(512);
        let st = g.alloc(1);
        g.add_chain(0, &[(h, 16, false), (d, 512, true), (st, 1, true)]);
    }
    g.kick(0);
    // Burst 1 + bucket 2: three requests now, then nothing for an hour.
    assert_eq!(g.wait_used(0, 3).len(), 3);
    assert!(dev.lock().unwrap().is_throttled());
    g.kick(0);
    assert!(dev.lock().unwrap().is_throttled());
    assert!(g.take_used(0).is_empty());
}

/// Runs `hostile` against a fresh device and checks the device declared itself broken without
/// touching memory outside the guest, then recovers after a reset.
fn expect_needs_reset(what: &str, hostile: impl FnOnce(&mut TestGuest)) {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), Format::Raw, 1 << 20);
    let mut g = guest(device(&path, false));
    hostile(&mut g);
    g.kick(0);
    g.wait_until(what, |g| g.status() & status::NEEDS_RESET != 0);
    assert_ne!(g.interrupt.status() & INT_CONFIG, 0, "{what}: config interrupt");
    assert!(g.irq.read().unwrap() >= 1, "{what}: irqfd written");
    assert!(g.outside_untouched(), "{what}: memory outside the guest changed");
    // A reset and a fresh initialisation bring the device back.
    assert_eq!(g.init(ALL, &[16]) & (status::NEEDS_RESET | status::DRIVER_OK), status::DRIVER_OK, "{what}");
    assert_eq!(submit(&mut g, req::IN, 0, &[], 512).0, S_OK, "{what}: works after reset");
}

#[test]
fn descriptor_loops_break_the_device() {
    expect_needs_reset("loop", |g| {
        let h = header(g, req::IN, 0);
        g.write_desc(0, 0, h, 16, DESC_NEXT, 1);
        g.write_desc(0, 1, h, 16, DESC_NEXT, 0);
        g.publish(0, 0);
    });
}

#[test]
fn chains_longer_than_the_queue_break_the_device() {
    expect_needs_reset("too long", |g| {
        let d = g.alloc(512);
        for i in 0..16u16 {
            g.write_desc(0, i, d, 512, DESC_NEXT | DESC_WRITE, (i + 1) % 16);
        }
        g.publish(0, 0);
    });
}

#[test]
fn next_index_out_of_range_breaks_the_device() {
    expect_needs_reset("next out of range", |g| {
        let h = header(g, req::IN, 0);
        g.write_desc(0, 0, h, 16, DESC_NEXT, 1000);
        g.publish(0, 0);
    });
}

#[test]
fn head_index_out_of_range_breaks_the_device() {
    expect_needs_reset("head out of range", |g| g.publish(0, 40000));
}

#[test]
fn buffers_outside_guest_memory_break_the_device() {
    for (addr, len) in [(MEM_SIZE as u64 - 8, 512u32), (MEM_SIZE as u64, 1), (u64::MAX - 10, 512), (0x1000, u32::MAX)] {
        expect_needs_reset("outside memory", |g| {
            let h = header(g, req::IN, 0);
            let st = g.alloc(1);
            g.add_chain(0, &[(h, 16, false), (addr, len, true), (st, 1, true)]);
        });
    }
}

#[test]
fn chains_over_4_gib_break_the_device() {
    expect_needs_reset("length overflow", |g| {
        // 257 buffers of all of guest memory (in an indirect table): each is valid, the sum is
        // over 4 GiB.
        let n = 257u16;
        let table = g.alloc(usize::from(n) * 16);
        for i in 0..n {
            let flags = DESC_WRITE | if i + 1 < n { DESC_NEXT } else { 0 };
            g.write_desc_at(table + u64::from(i) * 16, 0, MEM_SIZE as u32, flags, i + 1);
        }
        g.write_desc(0, 0, table, u32::from(n) * 16, crate::testing::DESC_INDIRECT, 0);
        g.publish(0, 0);
    });
}

#[test]
fn broken_indirect_tables_break_the_device() {
    expect_needs_reset("indirect loop", |g| {
        let table = g.alloc(64);
        let h = header(g, req::IN, 0);
        g.write_desc_at(table, h, 16, DESC_NEXT, 1);
        g.write_desc_at(table + 16, h, 16, DESC_NEXT, 0);
        g.write_desc(0, 0, table, 32, crate::testing::DESC_INDIRECT, 0);
        g.publish(0, 0);
    });
}

#[test]
fn avail_index_jumps_break_the_device() {
    expect_needs_reset("avail jump", |g| g.set_avail_idx(0, 100));
}

#[test]
fn bad_queue_set_up_fails_activation() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), Format::Raw, 1 << 20);
    let cases: [(&str, u16, u64); 4] = [
        ("rings outside memory", 16, MEM_SIZE as u64 - 0x100),
        ("rings past 4 GiB", 16, 1 << 40),
        ("size not a power of two", 12, 0x10000),
        ("size over the maximum", 512, 0x10000),
    ];
    for (what, size, base) in cases {
        let mut g = TestGuest::new(device(&path, false));
        g.negotiate(ALL);
        g.setup_queue_at(0, size, base, base + 0x1000, base + 0x2000);
        let s = g.driver_ok();
        assert_ne!(s & status::NEEDS_RESET, 0, "{what}: status {s:#x}");
        assert!(!g.transport.is_activated(), "{what}");
        assert!(g.outside_untouched());
    }
}

#[test]
fn feature_negotiation_follows_the_spec() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), Format::Raw, 1 << 20);
    let mut g = TestGuest::new(device(&path, false));
    assert_eq!(g.read_reg(crate::mmio::reg::MAGIC), crate::mmio::MMIO_MAGIC);
    assert_eq!(g.read_reg(crate::mmio::reg::VERSION), 2);
    assert_eq!(g.read_reg(crate::mmio::reg::DEVICE_ID), 2);
    // Without VERSION_1 (a legacy driver) FEATURES_OK does not stick.
    let s = g.negotiate(features::FLUSH);
    assert_eq!(s & status::FEATURES_OK, 0);
    // Features the device did not offer are refused too.
    g.write_reg(crate::mmio::reg::STATUS, 0);
    g.write_reg(crate::mmio::reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    g.write_reg(crate::mmio::reg::DRIVER_FEATURES_SEL, 1);
    g.write_reg(crate::mmio::reg::DRIVER_FEATURES, 0xffff_ffff);
    g.write_reg(crate::mmio::reg::STATUS, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
    assert_eq!(g.status() & status::FEATURES_OK, 0);
    // DRIVER_OK before FEATURES_OK does nothing.
    assert_eq!(g.driver_ok() & status::DRIVER_OK, 0);
    // Odd-sized register accesses are ignored.
    let mut b = [0xffu8; 2];
    g.transport.read(crate::mmio::reg::MAGIC, &mut b);
    assert_eq!(b, [0, 0]);
}
