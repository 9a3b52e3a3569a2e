//! Throughput of the virtio-blk and virtio-rng devices through the test driver (a guest played
//! in-process: no KVM exits, no guest kernel): what the device model and its event loop cost.
//!
//! `cargo run --release -p isla-virtio --features testing --example virtio-bench [DIR]`
//! (DIR holds the temporary disk image; default: the system temp directory).

use std::sync::{Arc, Mutex};
use std::time::Instant;

use isla_disk::{CreateOptions, Format};
use isla_virtio::block::{req, Block, BlockConfig};
use isla_virtio::rng::{Rng, RngConfig};
use isla_virtio::testing::TestGuest;
use isla_virtio::VIRTIO_F_VERSION_1;

const DISK: u64 = 256 << 20;

/// Runs `count` requests of `len` bytes (one in flight at a time); returns requests per second.
fn block_run(g: &mut TestGuest, kind: u32, len: u32, count: u64, random: bool) -> f64 {
    let hdr = g.alloc(16);
    let data = g.alloc(len as usize);
    let status = g.alloc(1);
    let sectors = DISK / 512 - u64::from(len / 512);
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let start = Instant::now();
    for i in 0..count {
        let sector = if random {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % sectors / 8 * 8
        } else {
            (i * u64::from(len / 512)) % sectors
        };
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        g.write(hdr, &h);
        let data_desc = (data, len, kind == req::IN);
        g.add_chain(0, &[(hdr, 16, false), data_desc, (status, 1, true)]);
        g.kick(0);
        g.wait_used(0, 1);
        assert_eq!(g.read(status, 1)[0], 0, "request failed");
    }
    count as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let dir = std::env::args().nth(1).map(std::path::PathBuf::from).unwrap_or_else(std::env::temp_dir);
    let path = dir.join(format!("isla-virtio-bench-{}.raw", std::process::id()));
    isla_disk::create(&path, &CreateOptions::new(Format::Raw, DISK)).expect("create disk");
    let cfg = BlockConfig { path: path.clone(), read_only: false, format: None, id: None, rate_limiter: None };
    let dev = Arc::new(Mutex::new(Block::new(cfg).expect("open disk")));
    let mut g = TestGuest::new(dev);
    g.init(u64::MAX, &[256]);
    let mib = 1u32 << 20;
    let w = block_run(&mut g, req::OUT, mib, 256, false);
    println!("virtio-blk raw sequential write 1 MiB: {:.0} MiB/s", w);
    let r = block_run(&mut g, req::IN, mib, 256, false);
    println!("virtio-blk raw sequential read  1 MiB: {:.0} MiB/s", r);
    let iops = block_run(&mut g, req::IN, 4096, 20_000, true);
    println!("virtio-blk raw random read 4 KiB, queue depth 1: {:.0} IOPS", iops);
    drop(g);
    let _ = std::fs::remove_file(&path);

    let mut g = TestGuest::new(Arc::new(Mutex::new(Rng::new(RngConfig::default()))));
    g.init(VIRTIO_F_VERSION_1, &[256]);
    let buf = g.alloc(64 << 10);
    let start = Instant::now();
    let n = 2000;
    for _ in 0..n {
        g.add_chain(0, &[(buf, 64 << 10, true)]);
        g.kick(0);
        g.wait_used(0, 1);
    }
    let mbs = f64::from(n) * 64.0 / 1024.0 / start.elapsed().as_secs_f64();
    println!("virtio-rng 64 KiB requests: {mbs:.0} MiB/s");
}
