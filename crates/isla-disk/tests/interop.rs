//! Interoperability with QEMU's own tools, both ways, and a randomized comparison against a raw
//! reference file. Needs `qemu-img` and `qemu-io` (Debian package qemu-utils).

mod common;

use common::*;
use isla_disk::{snapshot, BlockBackend, CreateOptions, Format, OpenOptions, RepairMode};

/// Applies one random operation to the device and to the reference buffer.
fn random_op(rng: &mut Rng, dev: &mut dyn BlockBackend, reference: &mut [u8], cluster: u64) {
    let size = reference.len() as u64;
    let (off, len) = random_range(rng, size, cluster);
    let (o, l) = (off as usize, len as usize);
    match rng.below(10) {
        0..=4 => {
            let mut data = vec![0u8; l];
            rng.fill(&mut data);
            dev.write_at(&data, off).unwrap();
            reference[o..o + l].copy_from_slice(&data);
        }
        5 | 6 => {
            let mut got = vec![0u8; l];
            dev.read_at(&mut got, off).unwrap();
            assert!(got == reference[o..o + l], "read mismatch at {off} len {len}");
        }
        7 => {
            dev.write_zeroes(off, len).unwrap();
            reference[o..o + l].fill(0);
        }
        _ => {
            // Discard deallocates whole clusters only; those read as zeros afterwards.
            dev.discard(off, len).unwrap();
            let first = off.div_ceil(cluster) * cluster;
            let end = off + len;
            let last = if end == size { end } else { end / cluster * cluster };
            if last > first {
                reference[first as usize..last as usize].fill(0);
            }
        }
    }
}

/// Random operations on a qcow2 (over a randomly filled backing file when `backing`), compared
/// with a reference buffer, then read back by isla and by qemu.
fn randomized(name: &str, cluster: u32, size: u64, ops: usize, seed: u64, backing: bool) {
    let dir = Scratch::new(name);
    let img = dir.path("r.qcow2");
    let mut reference = vec![0u8; size as usize];
    let mut rng = Rng(seed);
    if backing {
        let base = dir.path("base.qcow2");
        create_qcow2(&base, size, 65536);
        let mut b = open_rw(&base);
        for _ in 0..200 {
            let (off, len) = random_range(&mut rng, size, 65536);
            let mut data = vec![0u8; len as usize];
            rng.fill(&mut data);
            b.write_at(&data, off).unwrap();
            reference[off as usize..(off + len) as usize].copy_from_slice(&data);
        }
        drop(b);
        create_overlay(&img, "base.qcow2", Format::Qcow2, Some(cluster));
    } else {
        create_qcow2(&img, size, cluster);
    }
    {
        let mut dev = open_rw(&img);
        for _ in 0..ops {
            random_op(&mut rng, dev.as_mut(), &mut reference, u64::from(cluster));
        }
        dev.flush().unwrap();
    }
    qemu_check_clean(&img);
    assert!(isla_content(&img) == reference, "isla's reading differs from the reference");
    assert!(qemu_content(&img, &dir) == reference, "qemu's reading differs from the reference");
    let report = isla_disk::check(&img, RepairMode::None).unwrap();
    assert!(report.is_clean(), "{:?}", report.messages);
}

#[test]
fn randomized_io_matches_raw_reference_64k_clusters() {
    randomized("rand64k", 65536, 8 << 20, 3000, 0x5eed_0001, false);
}

#[test]
fn randomized_io_over_a_backing_file_matches_raw_reference() {
    randomized("randbacking", 4096, 4 << 20, 3000, 0x5eed_0007, true);
}

#[test]
fn randomized_io_matches_raw_reference_512b_clusters_grows_refcount_table() {
    // 512-byte clusters: 256 refcounts per block, 64 table entries per cluster: the refcount
    // table has to move and grow several times for 4 MiB of data.
    randomized("rand512", 512, 4 << 20, 3000, 0x5eed_0002, false);
}

#[test]
fn qemu_made_chain_with_snapshot_reads_correctly() {
    let dir = Scratch::new("qemu-chain");
    let base = dir.path("base.qcow2");
    let top = dir.path("top.qcow2");
    qemu_img(&["create", "-f", "qcow2", s(&base), "4M"]);
    qemu_io(&base, "qcow2", "write -P 0xab 0 64k");
    qemu_io(&base, "qcow2", "write -P 0x11 1M 100k");
    qemu_img(&["create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", s(&top)]);
    qemu_io(&top, "qcow2", "write -P 0xcd 32k 64k");
    qemu_img(&["snapshot", "-c", "before", s(&top)]);
    let at_snapshot = qemu_content(&top, &dir);
    qemu_io(&top, "qcow2", "write -P 0xef 60k 8k");
    qemu_io(&top, "qcow2", "write -z 1M 4k");
    let now = qemu_content(&top, &dir);
    assert_eq!(now[0], 0xab);
    assert_eq!(now[40 << 10], 0xcd);
    assert_eq!(now[61 << 10], 0xef);
    assert_eq!(now[1 << 20], 0);
    assert_eq!(now[(1 << 20) + 5000], 0x11);
    assert!(isla_content(&top) == now, "isla reads the qemu-made chain differently");

    // isla applies qemu's snapshot; qemu agrees with the result and with the image.
    snapshot::apply(&top, "before").unwrap();
    qemu_check_clean(&top);
    assert!(qemu_content(&top, &dir) == at_snapshot);
    assert!(isla_content(&top) == at_snapshot);
    // isla writes into the qemu-made overlay; the base is untouched.
    let base_before = qemu_content(&base, &dir);
    {
        let mut d = open_rw(&top);
        d.write_at(&[0x77; 5000], 3000).unwrap();
    }
    qemu_check_clean(&top);
    let mut want = at_snapshot.clone();
    want[3000..8000].fill(0x77);
    assert!(qemu_content(&top, &dir) == want);
    assert!(qemu_content(&base, &dir) == base_before);
    snapshot::delete(&top, "before").unwrap();
    qemu_check_clean(&top);
    assert!(qemu_content(&top, &dir) == want);
}

#[test]
fn isla_snapshots_are_qemu_snapshots() {
    let dir = Scratch::new("snap-interop");
    let img = dir.path("s.qcow2");
    create_qcow2(&img, 2 << 20, 65536);
    {
        let mut d = open_rw(&img);
        d.write_at(&[1u8; 200_000], 10_000).unwrap();
    }
    snapshot::create(&img, "one").unwrap();
    let one = isla_content(&img);
    {
        let mut d = open_rw(&img);
        d.write_at(&[2u8; 70_000], 100_000).unwrap();
        d.write_zeroes(0, 65536).unwrap();
    }
    snapshot::create(&img, "two").unwrap();
    let two = isla_content(&img);
    {
        let mut d = open_rw(&img);
        d.write_at(&[3u8; 1000], 150_000).unwrap();
    }
    qemu_check_clean(&img);
    let listed = qemu_img(&["snapshot", "-l", s(&img)]);
    assert!(listed.contains("one") && listed.contains("two"), "{listed}");
    let info = qemu_img(&["info", "--output=json", s(&img)]);
    assert!(info.contains("\"name\": \"two\""), "{info}");

    // qemu applies isla's snapshot on one copy, isla on another: same bytes.
    let copy = dir.path("copy.qcow2");
    std::fs::copy(&img, &copy).unwrap();
    qemu_img(&["snapshot", "-a", "one", s(&copy)]);
    snapshot::apply(&img, "one").unwrap();
    qemu_check_clean(&img);
    qemu_check_clean(&copy);
    assert!(qemu_content(&copy, &dir) == one);
    assert!(qemu_content(&img, &dir) == one);

    // qemu takes a snapshot of isla's image; isla lists and applies it.
    qemu_io(&img, "qcow2", "write -P 0x44 0 4k");
    qemu_img(&["snapshot", "-c", "three", s(&img)]);
    let names: Vec<String> = snapshot::list(&img).unwrap().into_iter().map(|s| s.name).collect();
    assert_eq!(names, ["one", "two", "three"]);
    snapshot::apply(&img, "two").unwrap();
    assert!(isla_content(&img) == two);
    snapshot::delete(&img, "two").unwrap();
    snapshot::delete(&img, "1").unwrap(); // by id
    qemu_check_clean(&img);
    assert!(qemu_content(&img, &dir) == two);
    let listed = qemu_img(&["snapshot", "-l", s(&img)]);
    assert!(listed.contains("three") && !listed.contains("one"), "{listed}");
    assert!(isla_disk::check(&img, RepairMode::None).unwrap().is_clean());
}

#[test]
fn snapshot_write_delete_sequences_keep_refcounts_exact() {
    let dir = Scratch::new("snap-seq");
    let img = dir.path("q.qcow2");
    let size = 1 << 20;
    create_qcow2(&img, size, 512);
    let mut reference = vec![0u8; size as usize];
    let mut saved: Vec<(String, Vec<u8>)> = Vec::new();
    let mut rng = Rng(0x5eed_0003);
    for round in 0..12 {
        {
            let mut d = open_rw(&img);
            for _ in 0..60 {
                random_op(&mut rng, d.as_mut(), &mut reference, 512);
            }
        }
        match rng.below(4) {
            0 | 1 => {
                let name = format!("s{round}");
                snapshot::create(&img, &name).unwrap();
                saved.push((name, reference.clone()));
            }
            2 if !saved.is_empty() => {
                let (name, data) = saved[rng.below(saved.len() as u64) as usize].clone();
                snapshot::apply(&img, &name).unwrap();
                reference = data;
            }
            _ if !saved.is_empty() => {
                let (name, _) = saved.remove(rng.below(saved.len() as u64) as usize);
                snapshot::delete(&img, &name).unwrap();
            }
            _ => {}
        }
        qemu_check_clean(&img);
        assert!(isla_content(&img) == reference, "round {round}: content differs");
    }
    assert!(qemu_content(&img, &dir) == reference);
}

#[test]
fn linked_clone_over_shared_base() {
    let dir = Scratch::new("clone");
    let base = dir.path("base.raw");
    isla_disk::create(&base, &CreateOptions::new(Format::Raw, 1 << 20)).unwrap();
    {
        let mut d = open_rw(&base);
        d.write_at(&[9u8; 300_000], 0).unwrap();
    }
    let base_bytes = std::fs::read(&base).unwrap();
    let clones: Vec<_> = (0..2).map(|i| dir.path(&format!("clone{i}.qcow2"))).collect();
    for (i, c) in clones.iter().enumerate() {
        create_overlay(c, "base.raw", Format::Raw, None);
        let mut d = open_rw(c);
        assert_eq!(d.size(), 1 << 20);
        d.write_at(&[i as u8 + 1; 1000], 100).unwrap();
        // Zeroing over a backing file must hide the base's data.
        d.write_zeroes(65536, 65536).unwrap();
        d.discard(131072, 65536).unwrap();
    }
    assert_eq!(std::fs::read(&base).unwrap(), base_bytes, "a clone wrote into the shared base");
    for (i, c) in clones.iter().enumerate() {
        qemu_check_clean(c);
        let mut want = base_bytes.clone();
        want[100..1100].fill(i as u8 + 1);
        want[65536..196_608].fill(0);
        assert!(qemu_content(c, &dir) == want, "clone {i} reads wrong through qemu");
        assert!(isla_content(c) == want, "clone {i} reads wrong through isla");
        assert!(std::fs::metadata(c).unwrap().len() < 400_000, "a clone is not thin");
    }
    let info = isla_disk::info(&clones[0]).unwrap();
    assert_eq!(info.backing_filename.as_deref(), Some("base.raw"));
    assert_eq!(info.backing_filename_format.as_deref(), Some("raw"));
}

#[test]
fn resize_and_convert_round_trip() {
    let dir = Scratch::new("resize");
    let img = dir.path("g.qcow2");
    // 512-byte clusters: 64 L1 entries span 2 MiB each, so growing to 64 MiB moves the L1 table.
    create_qcow2(&img, 1 << 20, 512);
    {
        let mut d = open_rw(&img);
        d.write_at(&[5u8; 4096], 1000).unwrap();
    }
    snapshot::create(&img, "small").unwrap();
    isla_disk::resize(&img, 64 << 20).unwrap();
    {
        let mut d = open_rw(&img);
        assert_eq!(d.size(), 64 << 20);
        d.write_at(&[6u8; 4096], (64 << 20) - 4096).unwrap();
    }
    qemu_check_clean(&img);
    let grown = qemu_content(&img, &dir);
    assert!(isla_content(&img) == grown);
    assert_eq!(grown[(64 << 20) - 1], 6);
    assert!(matches!(isla_disk::resize(&img, 1 << 20), Err(isla_disk::DiskError::Unsupported { .. })));
    let qi = qemu_img(&["info", "--output=json", s(&img)]);
    assert!(qi.contains("\"virtual-size\": 67108864"), "{qi}");

    // qcow2 -> raw -> qcow2, all through isla; qemu reads the same bytes.
    let raw = dir.path("g.raw");
    let back = dir.path("g2.qcow2");
    isla_disk::convert(&img, &raw, Format::Raw, None, |_, _| {}).unwrap();
    assert!(std::fs::read(&raw).unwrap() == grown);
    isla_disk::convert(&raw, &back, Format::Qcow2, Some(4096), |_, _| {}).unwrap();
    qemu_check_clean(&back);
    assert!(qemu_content(&back, &dir) == grown);
    assert!(std::fs::metadata(&back).unwrap().len() < 1 << 20, "convert did not keep the image thin");
    // Raw images shrink.
    isla_disk::resize(&raw, 1 << 20).unwrap();
    assert_eq!(isla_disk::info(&raw).unwrap().virtual_size, 1 << 20);
    // Applying the pre-resize snapshot brings the old size back.
    snapshot::apply(&img, "small").unwrap();
    qemu_check_clean(&img);
    assert_eq!(isla_content(&img).len(), 1 << 20);
}

#[test]
fn check_finds_and_repairs_leaks_and_corruptions() {
    let dir = Scratch::new("check");
    let img = dir.path("c.qcow2");
    create_qcow2(&img, 1 << 20, 65536);
    {
        let mut d = open_rw(&img);
        d.write_at(&[1u8; 3 * 65536], 0).unwrap();
    }
    qemu_check_clean(&img);
    let data = isla_content(&img);
    // The image has one refcount block; find it from the header and the refcount table.
    let bytes = std::fs::read(&img).unwrap();
    let rt = u64::from_be_bytes(bytes[48..56].try_into().unwrap()) as usize;
    let block = u64::from_be_bytes(bytes[rt..rt + 8].try_into().unwrap()) as usize;
    let clusters = bytes.len() / 65536;
    let set_rc = |c: usize, v: u16| {
        let mut b = std::fs::read(&img).unwrap();
        b[block + 2 * c..block + 2 * c + 2].copy_from_slice(&v.to_be_bytes());
        std::fs::write(&img, b).unwrap();
    };
    // A leak: a cluster appended to the file and counted as used.
    let mut grown = std::fs::read(&img).unwrap();
    grown.resize(grown.len() + 65536, 0);
    std::fs::write(&img, grown).unwrap();
    set_rc(clusters, 1);
    let r = isla_disk::check(&img, RepairMode::None).unwrap();
    assert_eq!((r.leaks, r.corruptions), (1, 0), "{:?}", r.messages);
    assert_eq!(run("qemu-img", &["check", s(&img)]).0, 3, "qemu-img check should see the leak too");
    let r = isla_disk::check(&img, RepairMode::Leaks).unwrap();
    assert_eq!((r.leaks_fixed, r.leaks), (1, 0));
    qemu_check_clean(&img);
    // A corruption: the last data cluster counted as free.
    set_rc(clusters - 1, 0);
    let r = isla_disk::check(&img, RepairMode::None).unwrap();
    assert!(r.corruptions >= 1, "{:?}", r.messages);
    assert_eq!(run("qemu-img", &["check", s(&img)]).0, 2, "qemu-img check should see the corruption too");
    let r = isla_disk::check(&img, RepairMode::All).unwrap();
    assert!(r.is_clean() && r.corruptions_fixed >= 1, "{r:?}");
    qemu_check_clean(&img);
    assert!(isla_content(&img) == data);
}

#[test]
fn qemu_compressed_and_v2_images_read_correctly() {
    let dir = Scratch::new("compat");
    let src = dir.path("src.raw");
    let mut content = vec![0u8; 1 << 20];
    let mut rng = Rng(0x5eed_0004);
    for chunk in content.chunks_mut(4096).step_by(3) {
        let v = rng.below(4) as u8;
        chunk.fill(v); // compressible
    }
    std::fs::write(&src, &content).unwrap();
    let comp = dir.path("comp.qcow2");
    qemu_img(&["convert", "-c", "-O", "qcow2", s(&src), s(&comp)]);
    assert!(isla_content(&comp) == content, "compressed clusters read wrong");
    // Writes over compressed clusters rewrite them uncompressed; refcounts stay exact.
    {
        let mut d = open_rw(&comp);
        d.write_at(&[0xee; 10_000], 70_000).unwrap();
    }
    content[70_000..80_000].fill(0xee);
    qemu_check_clean(&comp);
    assert!(qemu_content(&comp, &dir) == content);
    let mut content = std::fs::read(&src).unwrap();
    let v2 = dir.path("v2.qcow2");
    qemu_img(&["convert", "-O", "qcow2", "-o", "compat=0.10", s(&src), s(&v2)]);
    {
        let mut d = open_rw(&v2);
        d.write_at(&[0x33; 5000], 500_000).unwrap();
        d.write_zeroes(0, 65536).unwrap();
    }
    content[500_000..505_000].fill(0x33);
    content[..65536].fill(0);
    qemu_check_clean(&v2);
    let got = qemu_content(&v2, &dir);
    let first_bad = got.iter().zip(&content).position(|(a, b)| a != b);
    assert!(first_bad.is_none(), "v2 image differs from byte {first_bad:?}");
    assert_eq!(isla_disk::info(&v2).unwrap().format_specific.unwrap().data.compat, "0.10");
    let r = isla_disk::open(&v2, OpenOptions { read_only: true, format: None }).unwrap();
    assert!(r.read_only());
}

#[test]
fn images_in_use_are_locked() {
    let dir = Scratch::new("lock");
    let base = dir.path("base.qcow2");
    let clone = dir.path("clone.qcow2");
    create_qcow2(&base, 1 << 20, 65536);
    create_overlay(&clone, "base.qcow2", Format::Qcow2, None);
    let writer = open_rw(&clone);
    let e = isla_disk::open(&clone, OpenOptions { read_only: false, format: None }).err().expect("two writers");
    assert!(matches!(e, isla_disk::DiskError::Locked { .. }), "{e}");
    assert!(isla_disk::open(&clone, OpenOptions { read_only: true, format: None }).is_err());
    // The base is being read through the clone: it cannot be opened for writing or snapshotted.
    assert!(isla_disk::open(&base, OpenOptions { read_only: false, format: None }).is_err());
    assert!(snapshot::create(&base, "x").is_err());
    // Other readers of the base and metadata readers are fine.
    assert!(isla_disk::open(&base, OpenOptions { read_only: true, format: None }).is_ok());
    assert!(isla_disk::info(&clone).is_ok());
    drop(writer);
    assert!(isla_disk::open(&base, OpenOptions { read_only: false, format: None }).is_ok());
}
