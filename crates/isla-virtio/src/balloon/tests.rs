use super::*;
use crate::testing::TestGuest;
use crate::{INT_CONFIG, VIRTIO_F_VERSION_1};

const TOUCHED: u64 = 8 << 20;
const PAGES: usize = 256;

fn balloon(stats: u16, reporting: bool) -> (Arc<Mutex<Balloon>>, BalloonHandle) {
    let b = Balloon::new(BalloonConfig {
        amount_mib: 0,
        deflate_on_oom: true,
        stats_polling_interval_s: stats,
        free_page_reporting: reporting,
    });
    let h = b.handle();
    (Arc::new(Mutex::new(b)), h)
}

/// Writes to every page of `[at, at + PAGES pages)` and returns how many are resident.
fn touch(g: &TestGuest, at: u64) -> usize {
    for i in 0..PAGES as u64 {
        g.write(at + i * PAGE, &[0x5a]);
    }
    resident(g, at)
}

fn resident(g: &TestGuest, at: u64) -> usize {
    let ptr = g.mem.get_host_address(GuestAddress(at)).unwrap();
    sys::resident_pages(ptr, PAGES * PAGE as usize).unwrap().iter().filter(|&&r| r).count()
}

#[test]
fn inflated_pages_leave_the_host() {
    let (dev, h) = balloon(0, false);
    let mut g = TestGuest::new_anonymous(dev);
    g.init(VIRTIO_F_VERSION_1 | features::DEFLATE_ON_OOM, &[16, 16]);
    assert_eq!(touch(&g, TOUCHED), PAGES);
    // The PFNs in reverse order, a duplicate, and frames outside guest memory.
    let mut pfns: Vec<u32> = (0..PAGES as u32).rev().map(|i| (TOUCHED / PAGE) as u32 + i).collect();
    pfns.push(pfns[0]);
    pfns.extend([u32::MAX, (crate::testing::MEM_SIZE as u64 / PAGE) as u32]);
    let bytes: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
    let a = g.alloc_with(&bytes);
    g.add_chain(0, &[(a, bytes.len() as u32, false)]);
    g.kick(0);
    g.wait_used(0, 1);
    assert_eq!(resident(&g, TOUCHED), 0);
    assert_eq!(h.discarded_pages(), PAGES as u64);
    assert_eq!(g.read(TOUCHED, 1), [0], "a given-back page reads as zero");
    // Deflate just returns the buffer.
    g.add_chain(1, &[(a, 4, false)]);
    g.kick(1);
    g.wait_used(1, 1);
    assert_eq!(g.status() & crate::mmio::status::NEEDS_RESET, 0);
}

#[test]
fn shared_file_memory_is_punched_out() {
    let (dev, h) = balloon(0, false);
    let mut g = TestGuest::new(dev);
    g.init(VIRTIO_F_VERSION_1, &[16, 16]);
    assert_eq!(touch(&g, TOUCHED), PAGES);
    let bytes: Vec<u8> = (0..PAGES as u32).flat_map(|i| ((TOUCHED / PAGE) as u32 + i).to_le_bytes()).collect();
    let a = g.alloc_with(&bytes);
    g.add_chain(0, &[(a, bytes.len() as u32, false)]);
    g.kick(0);
    g.wait_used(0, 1);
    assert_eq!(resident(&g, TOUCHED), 0);
    assert_eq!(g.read(TOUCHED, 1), [0]);
    assert_eq!(h.discarded_pages(), PAGES as u64);
    assert!(g.outside_untouched());
}

#[test]
fn target_actual_and_statistics() {
    let (dev, h) = balloon(1, false);
    let mut g = TestGuest::new_anonymous(dev);
    g.init(VIRTIO_F_VERSION_1 | features::STATS_VQ, &[16, 16, 16]);
    let gen = g.read_reg(crate::mmio::reg::CONFIG_GENERATION);
    h.set_target_mib(64).unwrap();
    assert_ne!(g.interrupt.status() & INT_CONFIG, 0);
    assert_ne!(g.read_reg(crate::mmio::reg::CONFIG_GENERATION), gen);
    assert_eq!(g.read_config(0, 4), (64 * 256u32).to_le_bytes());
    // The guest reports its progress.
    g.transport.write(crate::mmio::reg::CONFIG + 4, &(32 * 256u32).to_le_bytes());
    assert_eq!(h.actual_mib(), 32);
    // A statistics buffer: free and total memory, and an unknown tag.
    let mut s = Vec::new();
    for (tag, val) in [(4u16, 1000u64), (5, 5000), (999, 1)] {
        s.extend(tag.to_le_bytes());
        s.extend(val.to_le_bytes());
    }
    let a = g.alloc_with(&s);
    g.add_chain(2, &[(a, s.len() as u32, false)]);
    g.kick(2);
    g.wait_until("statistics", |_| h.stats().free_memory.is_some());
    assert_eq!((h.stats().free_memory, h.stats().total_memory, h.stats().swap_in), (Some(1000), Some(5000), None));
    // The buffer comes back at the next poll for the driver to refill.
    g.wait_used(2, 1);
}

#[test]
fn reported_free_pages_leave_the_host() {
    let (dev, h) = balloon(0, true);
    let mut g = TestGuest::new_anonymous(dev);
    // No statistics queue: the reporting queue is number 2.
    g.init(VIRTIO_F_VERSION_1 | features::REPORTING, &[16, 16, 16]);
    assert_eq!(touch(&g, TOUCHED), PAGES);
    g.add_chain(2, &[(TOUCHED, (PAGES as u64 * PAGE) as u32, true)]);
    g.kick(2);
    g.wait_used(2, 1);
    assert_eq!(resident(&g, TOUCHED), 0);
    assert_eq!(h.discarded_pages(), PAGES as u64);
}
