//! Corrupt and hostile images: each gets a clear error (never a panic), and nothing outside the
//! image is written.

mod common;

use std::path::Path;

use common::*;
use isla_disk::{open, snapshot, BlockBackend, DiskError, OpenOptions, RepairMode};

fn open_ro(p: &Path) -> Result<Box<dyn BlockBackend>, DiskError> {
    open(p, OpenOptions { read_only: true, format: None })
}

fn patch(p: &Path, at: usize, bytes: &[u8]) {
    let mut b = std::fs::read(p).unwrap();
    b[at..at + bytes.len()].copy_from_slice(bytes);
    std::fs::write(p, b).unwrap();
}

fn be64_at(p: &Path, at: usize) -> u64 {
    let b = std::fs::read(p).unwrap();
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

/// An image with data at guest offset 0 (64 KiB clusters): returns its L2 table's offset.
fn image_with_data(p: &Path) -> u64 {
    create_qcow2(p, 1 << 20, 65536);
    let mut d = open_rw(p);
    d.write_at(&[7u8; 65536], 0).unwrap();
    let l1 = be64_at(p, 40) as usize;
    be64_at(p, l1) & 0x00ff_ffff_ffff_fe00
}

#[test]
fn truncated_images_are_refused_clearly() {
    let dir = Scratch::new("trunc");
    let p = dir.path("t.qcow2");
    image_with_data(&p);
    let full = std::fs::read(&p).unwrap();
    for len in [0usize, 3, 50, 100, 65536, 2 * 65536 + 8, 3 * 65536 + 100, full.len() - 65536] {
        std::fs::write(&p, &full[..len]).unwrap();
        let result = open_ro(&p).and_then(|mut d| {
            let mut buf = vec![0u8; d.size() as usize];
            d.read_at(&mut buf, 0)
        });
        if len < 4 {
            // Too short for the magic: a (tiny) raw image, honestly.
            continue;
        }
        let e = result.expect_err(&format!("a file truncated to {len} bytes was accepted"));
        let msg = e.to_string();
        assert!(
            msg.contains("too short") || msg.contains("outside the file") || msg.contains("truncated"),
            "unclear error for {len} bytes: {msg}"
        );
    }
}

#[test]
fn cyclic_and_deep_backing_chains_are_refused() {
    let dir = Scratch::new("cycle");
    let a = dir.path("a.qcow2");
    let b = dir.path("b.qcow2");
    qemu_img(&["create", "-f", "qcow2", s(&a), "1M"]);
    qemu_img(&["create", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", s(&b)]);
    qemu_img(&["rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", s(&a)]);
    let e = open_ro(&a).err().expect("a backing loop was followed");
    assert!(matches!(e, DiskError::Backing { .. }) && e.to_string().contains("loops"), "{e}");
    // A file that is its own backing file.
    let c = dir.path("c.qcow2");
    qemu_img(&["create", "-f", "qcow2", s(&c), "1M"]);
    qemu_img(&["rebase", "-u", "-b", "c.qcow2", "-F", "qcow2", s(&c)]);
    assert!(open_ro(&c).err().is_some_and(|e| e.to_string().contains("loops")));
    // Metadata operations still work on such images (they do not open the chain).
    assert!(isla_disk::info(&c).is_ok());
    // A chain deeper than the limit.
    let mut prev = dir.path("d0.qcow2");
    qemu_img(&["create", "-f", "qcow2", s(&prev), "1M"]);
    for i in 1..=isla_disk::MAX_BACKING_DEPTH + 1 {
        let next = dir.path(&format!("d{i}.qcow2"));
        let name = prev.file_name().unwrap().to_str().unwrap().to_string();
        qemu_img(&["create", "-f", "qcow2", "-u", "-b", &name, "-F", "qcow2", s(&next), "1M"]);
        prev = next;
    }
    let e = open_ro(&prev).err().expect("an over-deep chain was opened");
    assert!(e.to_string().contains("deeper"), "{e}");
    // A missing backing file names the file.
    let m = dir.path("m.qcow2");
    qemu_img(&["create", "-f", "qcow2", "-u", "-b", "nowhere.qcow2", "-F", "qcow2", s(&m), "1M"]);
    let e = open_ro(&m).err().expect("a missing backing file was ignored");
    assert!(e.to_string().contains("nowhere.qcow2"), "{e}");
}

#[test]
fn refcount_overflow_is_an_error_and_changes_nothing() {
    let dir = Scratch::new("overflow");
    let p = dir.path("o.qcow2");
    qemu_img(&["create", "-f", "qcow2", "-o", "refcount_bits=1", s(&p), "1M"]);
    {
        let mut d = open_rw(&p);
        d.write_at(&[3u8; 100_000], 0).unwrap();
    }
    let before = std::fs::read(&p).unwrap();
    let e = snapshot::create(&p, "s").expect_err("a 1-bit refcount went to 2");
    assert!(matches!(e, DiskError::RefcountOverflow { .. }), "{e}");
    assert!(e.to_string().contains("refcount overflow"), "{e}");
    assert_eq!(std::fs::read(&p).unwrap(), before, "a failed snapshot changed the image");
    qemu_check_clean(&p);
}

#[test]
fn tables_pointing_outside_the_file_get_errors() {
    let dir = Scratch::new("outside");
    let p = dir.path("x.qcow2");
    let l2 = image_with_data(&p) as usize;
    // Data cluster far outside the file.
    patch(&p, l2, &(0x8000_0000_0000_0000u64 | 0x10_0000_0000).to_be_bytes());
    let mut d = open(&p, OpenOptions { read_only: false, format: None }).unwrap();
    let mut buf = vec![0u8; 4096];
    let e = d.read_at(&mut buf, 0).expect_err("read through a bad L2 entry");
    assert!(matches!(e, DiskError::Corrupt { .. }) && e.to_string().contains("outside the file"), "{e}");
    let e = d.write_at(&buf, 0).expect_err("write through a bad L2 entry");
    assert!(e.to_string().contains("outside the file"), "{e}");
    drop(d);
    let r = isla_disk::check(&p, RepairMode::None).unwrap();
    assert!(r.corruptions > 0, "{:?}", r.messages);
    // L2 table outside the file.
    let l1 = be64_at(&p, 40) as usize;
    patch(&p, l1, &(0x8000_0000_0000_0000u64 | 0x7_0000_0000).to_be_bytes());
    let mut d = open_ro(&p).unwrap();
    let e = d.read_at(&mut buf, 0).expect_err("read through a bad L1 entry");
    assert!(e.to_string().contains("outside the file"), "{e}");
    // L2 entry pointing at the header: writes must not land there.
    let q = dir.path("h.qcow2");
    let l2 = image_with_data(&q) as usize;
    patch(&q, l2, &(0x8000_0000_0000_0000u64).to_be_bytes());
    patch(&q, l2, &(0x8000_0000_0000_0000u64 | 0x200).to_be_bytes());
    let header = std::fs::read(&q).unwrap()[..65536].to_vec();
    let mut d = open_rw(&q);
    assert!(d.write_at(&[1u8; 100], 0).is_err());
    assert_eq!(std::fs::read(&q).unwrap()[..65536], header[..], "the header was overwritten");
}

#[test]
fn unsupported_features_are_named() {
    let dir = Scratch::new("features");
    let p = dir.path("f.qcow2");
    image_with_data(&p);
    let good = std::fs::read(&p).unwrap();
    let cases: [(usize, Vec<u8>, &str); 6] = [
        (32, 1u32.to_be_bytes().to_vec(), "encrypted"),
        (72, (1u64 << 9).to_be_bytes().to_vec(), "unknown incompatible"),
        (72, (1u64 << 2).to_be_bytes().to_vec(), "external data"),
        (72, (1u64 << 4).to_be_bytes().to_vec(), "extended L2"),
        (4, 4u32.to_be_bytes().to_vec(), "version 4"),
        (20, 30u32.to_be_bytes().to_vec(), "cluster_bits"),
    ];
    for (at, bytes, want) in cases {
        std::fs::write(&p, &good).unwrap();
        patch(&p, at, &bytes);
        let e = open_ro(&p).err().unwrap_or_else(|| panic!("accepted a header with {want}"));
        assert!(e.to_string().contains(want), "expected `{want}` in: {e}");
    }
    // The dirty bit: readable, but writing needs a repair first, which clears it.
    std::fs::write(&p, &good).unwrap();
    patch(&p, 72, &1u64.to_be_bytes());
    assert!(open_ro(&p).is_ok());
    let e = open(&p, OpenOptions { read_only: false, format: None }).err().expect("dirty image opened for writing");
    assert!(e.to_string().contains("check -r all"), "{e}");
    assert!(isla_disk::check(&p, RepairMode::All).unwrap().is_clean());
    assert!(open(&p, OpenOptions { read_only: false, format: None }).is_ok());
    qemu_check_clean(&p);
}

/// Mutates header fields and metadata bytes of a valid image (with snapshots) many times with
/// a fixed seed; every operation must return (Ok or Err) without panicking, the image file must
/// not balloon, and nothing else in the directory may change.
#[test]
fn mutated_images_never_panic() {
    let dir = Scratch::new("fuzz");
    let p = dir.path("z.qcow2");
    let bystander = dir.path("bystander.raw");
    std::fs::write(&bystander, [0x5a; 4096]).unwrap();
    create_qcow2(&p, 256 << 10, 512);
    {
        let mut d = open_rw(&p);
        let mut rng = Rng(0x5eed_0005);
        let mut data = vec![0u8; 40_000];
        rng.fill(&mut data);
        d.write_at(&data, 1000).unwrap();
    }
    snapshot::create(&p, "a").unwrap();
    {
        let mut d = open_rw(&p);
        d.write_at(&[9u8; 3000], 20_000).unwrap();
    }
    let good = std::fs::read(&p).unwrap();
    // Header fields: (offset, width).
    let fields = [
        (4, 4),
        (8, 8),
        (16, 4),
        (20, 4),
        (24, 8),
        (36, 4),
        (40, 8),
        (48, 8),
        (56, 4),
        (60, 4),
        (64, 8),
        (72, 8),
        (96, 4),
        (100, 4),
    ];
    let mut rng = Rng(0x5eed_0006);
    let mut opened = 0;
    for round in 0..400 {
        let mut b = good.clone();
        let mutations = 1 + rng.below(3);
        for _ in 0..mutations {
            if rng.below(2) == 0 {
                let (at, w) = fields[rng.below(fields.len() as u64) as usize];
                let v: u64 = match rng.below(5) {
                    0 => 0,
                    1 => u64::MAX,
                    2 => rng.below(64),
                    3 => 1 << rng.below(64),
                    _ => rng.next(),
                };
                b[at..at + w].copy_from_slice(&v.to_be_bytes()[8 - w..]);
            } else {
                let at = rng.below(b.len() as u64) as usize;
                b[at] ^= 1 << rng.below(8);
            }
        }
        std::fs::write(&p, &b).unwrap();
        opened += usize::from(exercise(&p, &mut rng, round));
        let len = std::fs::metadata(&p).unwrap().len();
        assert!(len < 64 << 20, "round {round}: the image grew to {len} bytes");
    }
    // The mutations must leave many images usable, or the deeper code paths go untested.
    assert!(opened > 100, "only {opened} of 400 mutated images opened for writing");
    eprintln!("{opened} of 400 mutated images opened for writing");
    assert_eq!(std::fs::read(&bystander).unwrap(), [0x5a; 4096]);
    let names: Vec<_> = std::fs::read_dir(&dir.0).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names.len(), 2, "files appeared: {names:?}");
}

/// Runs every operation on a (possibly broken) image; returns whether it opened for writing.
fn exercise(p: &Path, rng: &mut Rng, round: usize) -> bool {
    let _ = isla_disk::info(p);
    let _ = snapshot::list(p);
    if let Ok(mut d) = open_ro(p) {
        let size = d.size().min(1 << 20);
        let mut buf = vec![0u8; 8192];
        let mut off = 0;
        while off < size {
            let n = (size - off).min(8192) as usize;
            if d.read_at(&mut buf[..n], off).is_err() {
                break;
            }
            off += n as u64;
        }
    }
    let writable = open(p, OpenOptions { read_only: false, format: None });
    let opened = writable.is_ok();
    if let Ok(mut d) = writable {
        let size = d.size();
        if size > 0 {
            for _ in 0..4 {
                let off = rng.below(size);
                let len = (1 + rng.below(3000)).min(size - off);
                let _ = d.write_at(&vec![round as u8; len as usize], off);
            }
            let _ = d.write_zeroes(0, size.min(4096));
            let _ = d.discard(0, size.min(1024));
        }
    }
    match rng.below(4) {
        0 => drop(snapshot::create(p, "b")),
        1 => drop(snapshot::apply(p, "a")),
        2 => drop(snapshot::delete(p, "a")),
        _ => drop(isla_disk::resize(p, 512 << 10)),
    }
    let _ = isla_disk::check(p, if rng.below(2) == 0 { RepairMode::None } else { RepairMode::All });
    opened
}
