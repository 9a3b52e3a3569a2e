//! The qcow2 engine: cluster mapping through L1/L2 tables, allocation with exact refcounts,
//! copy-on-write of clusters shared with snapshots, zero clusters, backing files, growth of the
//! L1 and refcount tables.
//!
//! Refcounts follow QEMU's accounting: a cluster's refcount is the number of references to it,
//! where an L2 table reached from N L1 tables (the active one and snapshots') counts N times and
//! so do the data clusters it maps. An entry's COPIED flag (bit 63) is set exactly when the
//! cluster it points to has refcount 1, i.e. may be written in place. Every metadata write is
//! write-through (a refcount is raised before the reference to the cluster is written), so a
//! crash leaks clusters at worst.

use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::header::{self, Header, INCOMPAT_CORRUPT, INCOMPAT_DIRTY};
use crate::snapshot::Snapshot;
use crate::{check_range, open_chain, resolve_backing, BlockBackend, DiskError, Format, OpenOptions as DiskOpen};

pub(crate) const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
pub(crate) const REFT_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;
pub(crate) const COPIED: u64 = 1 << 63;
pub(crate) const COMPRESSED: u64 = 1 << 62;
pub(crate) const ZERO: u64 = 1;
/// L2 tables kept in memory (each one cluster).
const L2_CACHE_TABLES: usize = 64;

/// Where a guest cluster's data is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mapping {
    /// Never written: reads from the backing file, or zeros.
    Unallocated,
    /// Reads as zeros (zero flag).
    Zero,
    /// Host offset of the cluster.
    Data(u64),
    /// A compressed cluster's L2 entry.
    Compressed(u64),
}

pub(crate) struct Qcow2 {
    pub(crate) path: PathBuf,
    file: File,
    read_only: bool,
    pub(crate) h: Header,
    pub(crate) cs: u64,
    pub(crate) l2_entries: u64,
    pub(crate) l1: Vec<u64>,
    pub(crate) reftable: Vec<u64>,
    rc_bits: u32,
    /// Refcount entries per refcount block.
    pub(crate) rpb: u64,
    rc_max: u64,
    rc_cache: HashMap<u64, Vec<u8>>,
    l2_cache: HashMap<u64, Vec<u64>>,
    l2_fifo: VecDeque<u64>,
    /// Bytes in the host file.
    pub(crate) file_len: u64,
    /// End of the allocated area (cluster-aligned, >= file_len).
    pub(crate) end: u64,
    free_hint: u64,
    backing: Option<Box<dyn BlockBackend>>,
    pub(crate) snapshots: Vec<Snapshot>,
    /// Bytes the snapshot table takes on disk.
    pub(crate) snap_table_bytes: u64,
    /// Last decompressed cluster: (L2 entry, data).
    zcache: Option<(u64, Vec<u8>)>,
}

pub(crate) fn be_u64s(bytes: &[u8]) -> Vec<u64> {
    bytes
        .chunks_exact(8)
        .map(|c| {
            let mut a = [0u8; 8];
            a.copy_from_slice(c);
            u64::from_be_bytes(a)
        })
        .collect()
}

pub(crate) fn u64s_be(v: &[u64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_be_bytes()).collect()
}

fn rc_get(blk: &[u8], idx: u64, bits: u32) -> u64 {
    if bits < 8 {
        let bit = idx * u64::from(bits);
        let byte = blk[(bit / 8) as usize];
        (u64::from(byte) >> (bit % 8)) & ((1 << bits) - 1)
    } else {
        let w = (bits / 8) as usize;
        let at = idx as usize * w;
        blk[at..at + w].iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b))
    }
}

/// Sets an entry; returns the byte range changed.
fn rc_set(blk: &mut [u8], idx: u64, bits: u32, v: u64) -> (usize, usize) {
    if bits < 8 {
        let bit = idx * u64::from(bits);
        let at = (bit / 8) as usize;
        let shift = bit % 8;
        let mask = (((1u16 << bits) - 1) << shift) as u8;
        blk[at] = (blk[at] & !mask) | (((v << shift) as u8) & mask);
        (at, 1)
    } else {
        let w = (bits / 8) as usize;
        let at = idx as usize * w;
        for i in 0..w {
            blk[at + i] = (v >> (8 * (w - 1 - i))) as u8;
        }
        (at, w)
    }
}

impl Qcow2 {
    /// Opens an image. `chain` is `Some` to open the backing chain (the images already open above
    /// this one), `None` to leave it closed (metadata operations need no backing data).
    pub(crate) fn open(path: &Path, read_only: bool, chain: Option<&mut Vec<PathBuf>>) -> Result<Qcow2, DiskError> {
        Self::open_with(path, read_only, chain, false)
    }

    /// [`open`](Self::open); `repairing` allows writing to an image marked dirty or corrupt.
    pub(crate) fn open_with(
        path: &Path,
        read_only: bool,
        chain: Option<&mut Vec<PathBuf>>,
        repairing: bool,
    ) -> Result<Qcow2, DiskError> {
        let file =
            OpenOptions::new().read(true).write(!read_only).open(path).map_err(|e| DiskError::io(path, "open", e))?;
        if !read_only || chain.is_some() {
            crate::lock(&file, path, !read_only)?;
        }
        let file_len = file.metadata().map_err(|e| DiskError::io(path, "stat", e))?.len();
        let mut buf = vec![0u8; file_len.min(2 << 20) as usize];
        file.read_exact_at(&mut buf, 0).map_err(|e| DiskError::io(path, "read header", e))?;
        if buf.len() >= 24 {
            let bits = u32::from_be_bytes([buf[20], buf[21], buf[22], buf[23]]);
            if (9..=21).contains(&bits) {
                buf.truncate(1 << bits);
            }
        }
        let h = Header::parse(path, &buf, file_len)?;
        if !read_only && !repairing && h.incompatible & INCOMPAT_DIRTY != 0 {
            return Err(DiskError::corrupt(
                path,
                "the dirty bit is set (not closed cleanly with lazy refcounts); run `isla disk check -r all` first",
            ));
        }
        if !read_only && !repairing && h.incompatible & INCOMPAT_CORRUPT != 0 {
            return Err(DiskError::corrupt(
                path,
                "the image is marked corrupt; repair it with `isla disk check -r all`",
            ));
        }
        let cs = h.cluster_size();
        let mut l1b = vec![0u8; h.l1_size as usize * 8];
        file.read_exact_at(&mut l1b, h.l1_table_offset).map_err(|e| DiskError::io(path, "read L1 table", e))?;
        let mut rtb = vec![0u8; (u64::from(h.refcount_table_clusters) * cs) as usize];
        file.read_exact_at(&mut rtb, h.refcount_table_offset)
            .map_err(|e| DiskError::io(path, "read refcount table", e))?;
        let rc_bits = 1u32 << h.refcount_order;
        let mut img = Qcow2 {
            path: path.to_path_buf(),
            file,
            read_only,
            cs,
            l2_entries: cs / 8,
            l1: be_u64s(&l1b),
            reftable: be_u64s(&rtb),
            rc_bits,
            rpb: cs * 8 / u64::from(rc_bits),
            rc_max: if rc_bits == 64 { u64::MAX } else { (1u64 << rc_bits) - 1 },
            rc_cache: HashMap::new(),
            l2_cache: HashMap::new(),
            l2_fifo: VecDeque::new(),
            file_len,
            end: file_len.div_ceil(cs) * cs,
            free_hint: 0,
            backing: None,
            snapshots: Vec::new(),
            snap_table_bytes: 0,
            zcache: None,
            h,
        };
        let (snaps, bytes) = crate::snapshot::read_table(&img)?;
        img.snapshots = snaps;
        img.snap_table_bytes = bytes;
        if let (Some(chain), Some(name)) = (chain, img.h.backing_file.clone()) {
            img.backing = Some(img.open_backing(&name, chain)?);
        }
        if !read_only && img.h.version >= 3 && img.h.autoclear != 0 {
            // Autoclear features (bitmaps) are not maintained here: clearing the bits tells
            // other software their data is stale, as the specification requires.
            img.h.autoclear = 0;
            img.write_header()?;
        }
        Ok(img)
    }

    fn open_backing(&self, name: &str, chain: &mut Vec<PathBuf>) -> Result<Box<dyn BlockBackend>, DiskError> {
        let me = self.path.canonicalize().map_err(|e| DiskError::io(&self.path, "resolve path", e))?;
        let backing_err = |what: String| DiskError::Backing { path: self.path.clone(), what };
        if chain.contains(&me) {
            let names: Vec<String> =
                chain.iter().chain(std::iter::once(&me)).map(|p| p.display().to_string()).collect();
            return Err(backing_err(format!("the chain loops: {}", names.join(" -> "))));
        }
        if chain.len() >= crate::MAX_BACKING_DEPTH {
            return Err(backing_err(format!("the chain is deeper than {} images", crate::MAX_BACKING_DEPTH)));
        }
        chain.push(me);
        let resolved = resolve_backing(&self.path, Path::new(name));
        let format = match self.h.backing_format.as_deref() {
            None => None,
            Some("raw") => Some(Format::Raw),
            Some("qcow2") => Some(Format::Qcow2),
            Some(other) => return Err(backing_err(format!("backing file format `{other}` is not supported"))),
        };
        let b = open_chain(&resolved, DiskOpen { read_only: true, format }, chain)?;
        chain.pop();
        Ok(b)
    }

    pub(crate) fn has_backing_file(&self) -> bool {
        self.h.backing_file.is_some()
    }

    // ---- raw file access ----

    /// Reads `buf` from the host file; the whole range must be inside the file.
    pub(crate) fn pread(&self, buf: &mut [u8], off: u64, what: &str) -> Result<(), DiskError> {
        match off.checked_add(buf.len() as u64) {
            Some(e) if e <= self.file_len => {}
            _ => {
                return Err(DiskError::corrupt(
                    &self.path,
                    format!("{what} at {off:#x} ({} bytes) is outside the file ({} bytes)", buf.len(), self.file_len),
                ))
            }
        }
        self.file.read_exact_at(buf, off).map_err(|e| DiskError::io(&self.path, "read", e))
    }

    /// Reads data that may run past the end of the file (read as zeros there); it must start inside.
    fn pread_data(&self, buf: &mut [u8], off: u64) -> Result<(), DiskError> {
        if off >= self.file_len {
            return Err(DiskError::corrupt(
                &self.path,
                format!("data cluster at {off:#x} is outside the file ({} bytes)", self.file_len),
            ));
        }
        let n = (self.file_len - off).min(buf.len() as u64) as usize;
        self.file.read_exact_at(&mut buf[..n], off).map_err(|e| DiskError::io(&self.path, "read", e))?;
        buf[n..].fill(0);
        Ok(())
    }

    pub(crate) fn pwrite(&mut self, buf: &[u8], off: u64) -> Result<(), DiskError> {
        if self.read_only {
            return Err(DiskError::ReadOnly { path: self.path.clone() });
        }
        self.file.write_all_at(buf, off).map_err(|e| DiskError::io(&self.path, "write", e))?;
        self.file_len = self.file_len.max(off + buf.len() as u64);
        self.end = self.end.max(self.file_len.div_ceil(self.cs) * self.cs);
        Ok(())
    }

    /// Refuses a data or table write that would land on the header, the active L1 table or the
    /// refcount table: only a corrupt image points there.
    fn guard(&self, off: u64, len: u64, what: &str) -> Result<(), DiskError> {
        let hits = |start: u64, bytes: u64| bytes > 0 && off < start + bytes && start < off + len;
        let l1_bytes = self.l1.len() as u64 * 8;
        let rt_bytes = u64::from(self.h.refcount_table_clusters) * self.cs;
        let snap_bytes = if self.h.nb_snapshots > 0 { self.snap_table_bytes } else { 0 };
        if hits(0, self.cs)
            || hits(self.h.l1_table_offset, l1_bytes)
            || hits(self.h.refcount_table_offset, rt_bytes)
            || hits(self.h.snapshots_offset, snap_bytes)
        {
            return Err(DiskError::corrupt(&self.path, format!("{what} at {off:#x} overlaps the header or a table")));
        }
        Ok(())
    }

    pub(crate) fn write_header(&mut self) -> Result<(), DiskError> {
        let b = self.h.encode_fixed();
        self.pwrite(&b, 0)
    }

    pub(crate) fn sync(&mut self) -> Result<(), DiskError> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync_data().map_err(|e| DiskError::io(&self.path, "fsync", e))
    }

    // ---- refcounts ----

    fn rc_block(&mut self, off: u64) -> Result<&mut Vec<u8>, DiskError> {
        if !self.rc_cache.contains_key(&off) {
            if off % self.cs != 0 {
                return Err(DiskError::corrupt(
                    &self.path,
                    format!("refcount block offset {off:#x} is not cluster-aligned"),
                ));
            }
            let mut b = vec![0u8; self.cs as usize];
            self.pread(&mut b, off, "refcount block")?;
            self.rc_cache.insert(off, b);
        }
        self.rc_cache.get_mut(&off).ok_or_else(|| DiskError::corrupt(&self.path, "refcount block cache lost an entry"))
    }

    /// The refcount of host cluster `c` (0 where no refcount block covers it).
    pub(crate) fn refcount(&mut self, c: u64) -> Result<u64, DiskError> {
        let ti = c / self.rpb;
        let Some(&e) = self.reftable.get(ti as usize) else { return Ok(0) };
        let off = e & REFT_OFFSET_MASK;
        if off == 0 {
            return Ok(0);
        }
        let (idx, bits) = (c % self.rpb, self.rc_bits);
        Ok(rc_get(self.rc_block(off)?, idx, bits))
    }

    /// Sets host cluster `c`'s refcount, allocating refcount blocks and growing the refcount
    /// table as needed.
    pub(crate) fn set_refcount(&mut self, c: u64, v: u64) -> Result<(), DiskError> {
        if v > self.rc_max {
            return Err(DiskError::RefcountOverflow { path: self.path.clone(), offset: c * self.cs, max: self.rc_max });
        }
        let ti = (c / self.rpb) as usize;
        if ti >= self.reftable.len() {
            self.grow_reftable(ti + 1)?;
        }
        if self.reftable[ti] & REFT_OFFSET_MASK == 0 {
            if v == 0 {
                return Ok(());
            }
            // A new refcount block, appended; it then counts itself.
            let b = self.end;
            self.end += self.cs;
            self.pwrite(&vec![0u8; self.cs as usize], b)?;
            self.rc_cache.insert(b, vec![0u8; self.cs as usize]);
            self.reftable[ti] = b;
            let rt_off = self.h.refcount_table_offset + ti as u64 * 8;
            self.pwrite(&b.to_be_bytes(), rt_off)?;
            self.set_refcount(b / self.cs, 1)?;
        }
        let off = self.reftable[ti] & REFT_OFFSET_MASK;
        self.guard(off, self.cs, "refcount block")?;
        let (idx, bits) = (c % self.rpb, self.rc_bits);
        let blk = self.rc_block(off)?;
        let (at, n) = rc_set(blk, idx, bits, v);
        let bytes = blk[at..at + n].to_vec();
        self.pwrite(&bytes, off + at as u64)?;
        if v == 0 {
            self.free_hint = self.free_hint.min(c);
            let host = c * self.cs;
            self.l2_cache.remove(&host);
            self.zcache = None;
        }
        Ok(())
    }

    /// Makes the refcount table hold at least `min_entries`, moving it to the end of the file.
    fn grow_reftable(&mut self, min_entries: usize) -> Result<(), DiskError> {
        let per_cluster = self.cs / 8;
        let old_off = self.h.refcount_table_offset;
        let old_clusters = u64::from(self.h.refcount_table_clusters);
        let mut entries = (min_entries as u64).max(self.reftable.len() as u64 * 2);
        // Cover the new table itself and the blocks it will need, with room to spare.
        let clusters = loop {
            let clusters = entries.div_ceil(per_cluster);
            let covered_needed = (self.end / self.cs + clusters * 2 + 8).div_ceil(self.rpb);
            if covered_needed <= entries {
                break clusters;
            }
            entries = covered_needed;
        };
        if clusters * self.cs > header::MAX_REFTABLE_BYTES {
            return Err(DiskError::Invalid(format!(
                "{}: the image outgrew the largest refcount table (8 MiB); use a larger cluster size",
                self.path.display()
            )));
        }
        let new_off = self.end;
        self.end += clusters * self.cs;
        self.reftable.resize((clusters * per_cluster) as usize, 0);
        self.h.refcount_table_offset = new_off;
        self.h.refcount_table_clusters = clusters as u32;
        let table = u64s_be(&self.reftable);
        self.pwrite(&table, new_off)?;
        for c in 0..clusters {
            self.set_refcount(new_off / self.cs + c, 1)?;
        }
        let table = u64s_be(&self.reftable);
        self.pwrite(&table, new_off)?;
        self.write_header()?;
        for c in 0..old_clusters {
            self.set_refcount(old_off / self.cs + c, 0)?;
        }
        Ok(())
    }

    pub(crate) fn incref(&mut self, host: u64) -> Result<(), DiskError> {
        let c = host / self.cs;
        let r = self.refcount(c)?;
        if r >= self.rc_max {
            return Err(DiskError::RefcountOverflow { path: self.path.clone(), offset: host, max: self.rc_max });
        }
        self.set_refcount(c, r + 1)
    }

    pub(crate) fn decref(&mut self, host: u64) -> Result<(), DiskError> {
        let c = host / self.cs;
        let r = self.refcount(c)?;
        if r == 0 {
            return Err(DiskError::corrupt(
                &self.path,
                format!("refcount of cluster {host:#x} would drop below zero; run `isla disk check -r all`"),
            ));
        }
        self.set_refcount(c, r - 1)
    }

    /// Allocates one cluster (refcount 1): the first free one, or a new one at the end.
    pub(crate) fn alloc_cluster(&mut self) -> Result<u64, DiskError> {
        let end_c = self.end / self.cs;
        let mut c = self.free_hint;
        while c < end_c && self.refcount(c)? != 0 {
            c += 1;
        }
        if c >= end_c {
            c = end_c;
            self.end += self.cs;
        } else {
            self.guard(c * self.cs, self.cs, "free cluster").map_err(|_| {
                DiskError::corrupt(
                    &self.path,
                    format!("cluster {c} holds metadata but its refcount is 0; run `isla disk check -r all`"),
                )
            })?;
        }
        self.free_hint = c + 1;
        self.set_refcount(c, 1)?;
        Ok(c * self.cs)
    }

    /// Allocates `n` contiguous clusters at the end of the file.
    pub(crate) fn alloc_contiguous(&mut self, n: u64) -> Result<u64, DiskError> {
        if n == 1 {
            return self.alloc_cluster();
        }
        let start = self.end;
        self.end += n * self.cs;
        for i in 0..n {
            self.set_refcount(start / self.cs + i, 1)?;
        }
        Ok(start)
    }

    /// Host clusters a compressed cluster's data touches.
    pub(crate) fn compressed_span(&self, e: u64) -> (u64, u64) {
        let x = 62 - (self.h.cluster_bits - 8);
        let off = e & ((1u64 << x) - 1);
        let sectors = ((e >> x) & ((1u64 << (self.h.cluster_bits - 8)) - 1)) + 1;
        let end = (off & !511) + sectors * 512;
        (off, end - off)
    }

    pub(crate) fn compressed_clusters(&self, e: u64) -> std::ops::RangeInclusive<u64> {
        let (off, len) = self.compressed_span(e);
        (off / self.cs)..=((off + len - 1) / self.cs)
    }

    // ---- L1/L2 tables ----

    /// Validates an L1 entry's L2 table offset (`None` when unallocated).
    pub(crate) fn l2_offset(&self, l1e: u64, l1i: usize) -> Result<Option<u64>, DiskError> {
        let off = l1e & OFFSET_MASK;
        if off == 0 {
            return Ok(None);
        }
        if off % self.cs != 0 || off + self.cs > self.file_len {
            return Err(DiskError::corrupt(
                &self.path,
                format!("L1 entry {l1i} points to an L2 table at {off:#x}, unaligned or outside the file"),
            ));
        }
        Ok(Some(off))
    }

    pub(crate) fn l2_table(&mut self, off: u64) -> Result<&mut Vec<u64>, DiskError> {
        if !self.l2_cache.contains_key(&off) {
            let mut b = vec![0u8; self.cs as usize];
            self.pread(&mut b, off, "L2 table")?;
            if self.l2_fifo.len() >= L2_CACHE_TABLES {
                if let Some(old) = self.l2_fifo.pop_front() {
                    self.l2_cache.remove(&old);
                }
            }
            self.l2_fifo.push_back(off);
            self.l2_cache.insert(off, be_u64s(&b));
        }
        self.l2_cache.get_mut(&off).ok_or_else(|| DiskError::corrupt(&self.path, "L2 cache lost an entry"))
    }

    fn set_l2_entry(&mut self, l2: u64, i: u64, v: u64) -> Result<(), DiskError> {
        self.pwrite(&v.to_be_bytes(), l2 + i * 8)?;
        if let Some(t) = self.l2_cache.get_mut(&l2) {
            t[i as usize] = v;
        }
        Ok(())
    }

    pub(crate) fn write_l2_table(&mut self, off: u64, t: Vec<u64>) -> Result<(), DiskError> {
        self.guard(off, self.cs, "L2 table")?;
        self.pwrite(&u64s_be(&t), off)?;
        if let Some(c) = self.l2_cache.get_mut(&off) {
            *c = t;
        }
        Ok(())
    }

    pub(crate) fn set_l1_entry(&mut self, i: usize, v: u64) -> Result<(), DiskError> {
        self.l1[i] = v;
        let at = self.h.l1_table_offset + i as u64 * 8;
        self.pwrite(&v.to_be_bytes(), at)
    }

    pub(crate) fn write_l1_table(&mut self) -> Result<(), DiskError> {
        let b = u64s_be(&self.l1);
        let at = self.h.l1_table_offset;
        self.pwrite(&b, at)
    }

    /// Where guest cluster `gc` is.
    pub(crate) fn map(&mut self, gc: u64) -> Result<Mapping, DiskError> {
        let l1i = (gc / self.l2_entries) as usize;
        let Some(&l1e) = self.l1.get(l1i) else { return Ok(Mapping::Unallocated) };
        let Some(l2) = self.l2_offset(l1e, l1i)? else { return Ok(Mapping::Unallocated) };
        let i = (gc % self.l2_entries) as usize;
        let e = self.l2_table(l2)?[i];
        self.decode_l2(e, gc)
    }

    fn decode_l2(&self, e: u64, gc: u64) -> Result<Mapping, DiskError> {
        if e & COMPRESSED != 0 {
            return Ok(Mapping::Compressed(e));
        }
        if self.h.version >= 3 && e & ZERO != 0 {
            return Ok(Mapping::Zero);
        }
        let off = e & OFFSET_MASK;
        if off == 0 {
            return Ok(Mapping::Unallocated);
        }
        if off % self.cs != 0 || off >= self.file_len {
            return Err(DiskError::corrupt(
                &self.path,
                format!("L2 entry for guest cluster {gc} points to {off:#x}, unaligned or outside the file"),
            ));
        }
        Ok(Mapping::Data(off))
    }

    fn read_backing(&mut self, buf: &mut [u8], off: u64) -> Result<(), DiskError> {
        let Some(b) = self.backing.as_mut() else {
            buf.fill(0);
            return Ok(());
        };
        let bsize = b.size();
        let n = if off >= bsize { 0 } else { (bsize - off).min(buf.len() as u64) as usize };
        if n > 0 {
            b.read_at(&mut buf[..n], off)?;
        }
        buf[n..].fill(0);
        Ok(())
    }

    fn decompress(&mut self, e: u64) -> Result<&[u8], DiskError> {
        if self.zcache.as_ref().map(|z| z.0) != Some(e) {
            if self.h.compression_type != 0 {
                return Err(DiskError::unsupported(&self.path, "zstd-compressed clusters"));
            }
            let (off, len) = self.compressed_span(e);
            let mut input = vec![0u8; len as usize];
            self.pread_data(&mut input, off)?;
            let mut out = vec![0u8; self.cs as usize];
            let mut d = flate2::Decompress::new(false);
            let status = d.decompress(&input, &mut out, flate2::FlushDecompress::Finish);
            if status.is_err() || d.total_out() != self.cs {
                return Err(DiskError::corrupt(
                    &self.path,
                    format!("compressed cluster at {off:#x} does not inflate to one cluster"),
                ));
            }
            self.zcache = Some((e, out));
        }
        match &self.zcache {
            Some((_, d)) => Ok(d),
            None => Err(DiskError::corrupt(&self.path, "decompression cache lost its entry")),
        }
    }

    /// Reads part of one guest cluster given its mapping.
    fn read_mapped(&mut self, m: Mapping, gc: u64, in_off: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        match m {
            Mapping::Unallocated => self.read_backing(buf, gc * self.cs + in_off),
            Mapping::Zero => {
                buf.fill(0);
                Ok(())
            }
            Mapping::Data(host) => self.pread_data(buf, host + in_off),
            Mapping::Compressed(e) => {
                let d = self.decompress(e)?;
                buf.copy_from_slice(&d[in_off as usize..in_off as usize + buf.len()]);
                Ok(())
            }
        }
    }

    fn writable(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        if self.read_only {
            return Err(DiskError::ReadOnly { path: self.path.clone() });
        }
        check_range(offset, len, self.h.size)
    }

    /// The L2 table for L1 index `l1i`, made private to the active L1 (allocated or copied).
    fn l2_for_write(&mut self, l1i: usize) -> Result<u64, DiskError> {
        let l1e = *self
            .l1
            .get(l1i)
            .ok_or_else(|| DiskError::corrupt(&self.path, format!("L1 index {l1i} is past the L1 table")))?;
        let old = self.l2_offset(l1e, l1i)?;
        if let Some(o) = old {
            if l1e & COPIED != 0 {
                self.guard(o, self.cs, "L2 table")?;
                return Ok(o);
            }
        }
        let table = match old {
            Some(o) => {
                let shared = self.refcount(o / self.cs)? > 1;
                let mut t = self.l2_table(o)?.clone();
                if shared {
                    // Everything a shared table maps is shared too: no entry of the copy may be
                    // written in place, whatever flags the old table carried.
                    t.iter_mut().for_each(|e| *e &= !COPIED);
                }
                t
            }
            None => vec![0u64; self.l2_entries as usize],
        };
        let new = self.alloc_cluster()?;
        self.write_l2_table(new, table)?;
        self.set_l1_entry(l1i, new | COPIED)?;
        if let Some(o) = old {
            self.decref(o)?;
        }
        Ok(new)
    }

    /// Drops the reference an L2 entry held.
    fn release_entry(&mut self, e: u64) -> Result<(), DiskError> {
        if e & COMPRESSED != 0 {
            for c in self.compressed_clusters(e) {
                self.decref(c * self.cs)?;
            }
        } else if e & OFFSET_MASK != 0 {
            self.decref(e & OFFSET_MASK)?;
        }
        Ok(())
    }

    /// Writes `data` into guest cluster `gc` at `in_off`.
    fn write_in_cluster(&mut self, gc: u64, in_off: u64, data: &[u8]) -> Result<(), DiskError> {
        let l1i = (gc / self.l2_entries) as usize;
        let l2i = gc % self.l2_entries;
        let l2 = self.l2_for_write(l1i)?;
        let e = self.l2_table(l2)?[l2i as usize];
        let host = e & OFFSET_MASK;
        let cs = self.cs;
        if e & COMPRESSED == 0 && host != 0 && e & COPIED != 0 {
            if host % cs != 0 || host + cs > self.end {
                return Err(DiskError::corrupt(
                    &self.path,
                    format!("L2 entry for guest cluster {gc} points to {host:#x}, unaligned or outside the file"),
                ));
            }
            self.guard(host, cs, "data cluster")?;
            if self.h.version >= 3 && e & ZERO != 0 {
                let mut c = vec![0u8; cs as usize];
                c[in_off as usize..in_off as usize + data.len()].copy_from_slice(data);
                self.pwrite(&c, host)?;
                return self.set_l2_entry(l2, l2i, host | COPIED);
            }
            return self.pwrite(data, host + in_off);
        }
        let m = self.decode_l2(e, gc)?;
        let new = self.alloc_cluster()?;
        self.guard(new, cs, "data cluster")?;
        if in_off == 0 && data.len() as u64 == cs {
            self.pwrite(data, new)?;
        } else {
            let mut c = vec![0u8; cs as usize];
            self.read_mapped(m, gc, 0, &mut c)?;
            c[in_off as usize..in_off as usize + data.len()].copy_from_slice(data);
            self.pwrite(&c, new)?;
        }
        self.set_l2_entry(l2, l2i, new | COPIED)?;
        self.release_entry(e)
    }

    /// Makes a whole guest cluster read as zeros: unallocated when nothing shows through from
    /// a backing file, the zero flag (v3) otherwise. Returns false when it cannot (v2 over a
    /// backing file).
    fn zero_cluster(&mut self, gc: u64) -> Result<bool, DiskError> {
        let has_backing = self.has_backing_file();
        let want = if has_backing { ZERO } else { 0 };
        if has_backing && self.h.version < 3 {
            return Ok(false);
        }
        let l1i = (gc / self.l2_entries) as usize;
        let l2i = gc % self.l2_entries;
        let l1e = self.l1.get(l1i).copied().unwrap_or(0);
        let current = match self.l2_offset(l1e, l1i)? {
            None => 0,
            Some(l2) => self.l2_table(l2)?[l2i as usize],
        };
        if current == want {
            return Ok(true);
        }
        let l2 = self.l2_for_write(l1i)?;
        self.set_l2_entry(l2, l2i, want)?;
        self.release_entry(current)?;
        Ok(true)
    }

    fn zero_range(&mut self, offset: u64, len: u64, discard: bool) -> Result<(), DiskError> {
        self.writable(offset, len)?;
        let cs = self.cs;
        let mut off = offset;
        let end = offset + len;
        while off < end {
            let gc = off / cs;
            let in_off = off % cs;
            let n = (cs - in_off).min(end - off);
            let whole = in_off == 0 && (n == cs || off + n == self.h.size);
            let done = whole && self.zero_cluster(gc)?;
            if !done && !discard {
                self.write_in_cluster(gc, in_off, &vec![0u8; n as usize])?;
            }
            off += n;
        }
        Ok(())
    }

    /// Grows the active L1 table to `entries`, moving it to the end of the file.
    pub(crate) fn grow_l1(&mut self, entries: u64) -> Result<(), DiskError> {
        if entries * 8 > header::MAX_L1_BYTES {
            return Err(DiskError::Invalid(format!(
                "{}: the L1 table would exceed 32 MiB; use a larger cluster size",
                self.path.display()
            )));
        }
        let old_off = self.h.l1_table_offset;
        let old_clusters = (self.l1.len() as u64 * 8).div_ceil(self.cs);
        let clusters = (entries * 8).div_ceil(self.cs);
        let new_off = self.alloc_contiguous(clusters)?;
        self.l1.resize(entries as usize, 0);
        let mut b = u64s_be(&self.l1);
        b.resize((clusters * self.cs) as usize, 0);
        self.pwrite(&b, new_off)?;
        self.h.l1_table_offset = new_off;
        self.h.l1_size = entries as u32;
        self.write_header()?;
        for c in 0..old_clusters {
            self.decref(old_off + c * self.cs)?;
        }
        Ok(())
    }

    /// Grows the virtual size (shrinking a qcow2 image is refused).
    pub(crate) fn resize(mut self, new_size: u64) -> Result<(), DiskError> {
        if new_size < self.h.size {
            return Err(DiskError::unsupported(
                &self.path,
                format!(
                    "shrinking a qcow2 image ({} -> {new_size} bytes); convert it to raw, shrink that, and convert back",
                    self.h.size
                ),
            ));
        }
        if new_size % 512 != 0 {
            return Err(DiskError::Invalid(format!("new size {new_size} is not a multiple of 512 bytes")));
        }
        let need = header::l1_entries_for(new_size, self.h.cluster_bits);
        if need > self.l1.len() as u64 {
            self.grow_l1(need)?;
        }
        self.h.size = new_size;
        self.write_header()?;
        self.sync()
    }

    /// Updates the refcounts of everything an L1 table references (its L2 tables and, through
    /// each, their data clusters) by +1 or -1. Increments are checked for overflow before any
    /// refcount changes.
    pub(crate) fn l1_refs(&mut self, l1: &[u64], up: bool) -> Result<(), DiskError> {
        let mut targets: Vec<u64> = Vec::new();
        for (i, &e) in l1.iter().enumerate() {
            let Some(l2) = self.l2_offset(e, i)? else { continue };
            let table = self.l2_table(l2)?.clone();
            for (j, &d) in table.iter().enumerate() {
                if d & COMPRESSED != 0 {
                    targets.extend(self.compressed_clusters(d).map(|c| c * self.cs));
                    continue;
                }
                let off = d & OFFSET_MASK;
                if off != 0 {
                    if off % self.cs != 0 {
                        return Err(DiskError::corrupt(&self.path, format!("L2 table {l2:#x} entry {j} is unaligned")));
                    }
                    targets.push(off);
                }
            }
            targets.push(l2);
        }
        if up {
            let mut add: HashMap<u64, u64> = HashMap::new();
            for &t in &targets {
                *add.entry(t).or_insert(0) += 1;
            }
            for (&t, &n) in &add {
                let r = self.refcount(t / self.cs)?;
                if r.checked_add(n).is_none_or(|v| v > self.rc_max) {
                    return Err(DiskError::RefcountOverflow { path: self.path.clone(), offset: t, max: self.rc_max });
                }
            }
            for t in targets {
                self.incref(t)?;
            }
        } else {
            for t in targets {
                self.decref(t)?;
            }
        }
        Ok(())
    }

    /// Sets each active L1 and L2 entry's COPIED flag from its cluster's refcount.
    pub(crate) fn recompute_copied(&mut self) -> Result<(), DiskError> {
        for i in 0..self.l1.len() {
            let e = self.l1[i];
            let Some(l2) = self.l2_offset(e, i)? else { continue };
            let rc = self.refcount(l2 / self.cs)?;
            let want = if rc == 1 { e | COPIED } else { e & !COPIED };
            if want != e {
                self.set_l1_entry(i, want)?;
            }
            let mut table = self.l2_table(l2)?.clone();
            let mut changed = false;
            for d in table.iter_mut() {
                let off = *d & OFFSET_MASK;
                if *d & COMPRESSED != 0 || off == 0 {
                    continue;
                }
                let rc = self.refcount(off / self.cs)?;
                let want = if rc == 1 { *d | COPIED } else { *d & !COPIED };
                if want != *d {
                    *d = want;
                    changed = true;
                }
            }
            if changed {
                self.write_l2_table(l2, table)?;
            }
        }
        Ok(())
    }

    pub(crate) fn info(&self, actual_size: u64) -> crate::ImageInfo {
        let full =
            self.h.backing_file.as_ref().map(|b| resolve_backing(&self.path, Path::new(b)).display().to_string());
        crate::ImageInfo {
            filename: self.path.display().to_string(),
            format: Format::Qcow2,
            virtual_size: self.h.size,
            actual_size,
            cluster_size: Some(self.cs),
            backing_filename: self.h.backing_file.clone(),
            full_backing_filename: full,
            backing_filename_format: self.h.backing_format.clone(),
            dirty_flag: self.h.incompatible & INCOMPAT_DIRTY != 0,
            snapshots: self.snapshots.iter().map(Snapshot::info).collect(),
            format_specific: Some(crate::FormatSpecific {
                kind: "qcow2",
                data: crate::Qcow2Specific {
                    compat: if self.h.version >= 3 { "1.1" } else { "0.10" },
                    compression_type: if self.h.compression_type == 1 { "zstd" } else { "zlib" },
                    lazy_refcounts: self.h.compatible & header::COMPAT_LAZY_REFCOUNTS != 0,
                    refcount_bits: self.rc_bits,
                    corrupt: self.h.incompatible & INCOMPAT_CORRUPT != 0,
                    extended_l2: false,
                },
            }),
        }
    }
}

impl BlockBackend for Qcow2 {
    fn size(&self) -> u64 {
        self.h.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        check_range(offset, buf.len() as u64, self.h.size)?;
        let cs = self.cs;
        let mut pos = 0usize;
        while pos < buf.len() {
            let off = offset + pos as u64;
            let gc = off / cs;
            let in_off = off % cs;
            let n = ((cs - in_off) as usize).min(buf.len() - pos);
            let m = self.map(gc)?;
            if let Mapping::Data(host) = m {
                // Coalesce clusters that are contiguous in the host file into one read.
                let mut len = n;
                let mut next_host = host + in_off + n as u64;
                while pos + len < buf.len() {
                    let next_gc = (offset + (pos + len) as u64) / cs;
                    if self.map(next_gc)? != Mapping::Data(next_host) {
                        break;
                    }
                    let add = (cs as usize).min(buf.len() - pos - len);
                    len += add;
                    next_host += add as u64;
                }
                self.pread_data(&mut buf[pos..pos + len], host + in_off)?;
                pos += len;
                continue;
            }
            self.read_mapped(m, gc, in_off, &mut buf[pos..pos + n])?;
            pos += n;
        }
        Ok(())
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<(), DiskError> {
        self.writable(offset, buf.len() as u64)?;
        let cs = self.cs;
        let mut pos = 0usize;
        while pos < buf.len() {
            let off = offset + pos as u64;
            let in_off = off % cs;
            let n = ((cs - in_off) as usize).min(buf.len() - pos);
            self.write_in_cluster(off / cs, in_off, &buf[pos..pos + n])?;
            pos += n;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), DiskError> {
        self.sync()
    }

    fn discard(&mut self, offset: u64, len: u64) -> Result<(), DiskError> {
        self.zero_range(offset, len, true)
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), DiskError> {
        self.zero_range(offset, len, false)
    }
}

/// Creates a qcow2 v3 image: header, refcount table, L1 table, then the refcounts of those
/// (computed by the same allocator that serves writes, so they are exact by construction).
pub(crate) fn create(
    path: &Path,
    size: u64,
    cluster_size: u32,
    backing: Option<(&Path, Format)>,
) -> Result<(), DiskError> {
    if !cluster_size.is_power_of_two() || !(512..=(2 << 20)).contains(&cluster_size) {
        return Err(DiskError::Invalid(format!("cluster size {cluster_size} must be a power of two from 512 to 2M")));
    }
    if size % 512 != 0 {
        return Err(DiskError::Invalid(format!("size {size} is not a multiple of 512 bytes")));
    }
    let cluster_bits = cluster_size.trailing_zeros();
    let cs = u64::from(cluster_size);
    let l1_size = header::l1_entries_for(size, cluster_bits);
    if l1_size * 8 > header::MAX_L1_BYTES {
        return Err(DiskError::Invalid(format!("size {size} is too large for cluster size {cluster_size}")));
    }
    let backing_file = match backing {
        Some((p, _)) => {
            let s = p
                .to_str()
                .ok_or_else(|| DiskError::Invalid(format!("backing file name {} is not UTF-8", p.display())))?;
            if s.is_empty() || s.len() > header::MAX_BACKING_NAME as usize {
                return Err(DiskError::Invalid(format!("backing file name must be 1 to 1023 bytes long: {s:?}")));
            }
            Some(s.to_string())
        }
        None => None,
    };
    let mut h = Header {
        version: 3,
        backing_file_offset: 0,
        backing_file_size: 0,
        cluster_bits,
        size,
        crypt_method: 0,
        l1_size: l1_size as u32,
        l1_table_offset: 2 * cs,
        refcount_table_offset: cs,
        refcount_table_clusters: 1,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible: 0,
        compatible: 0,
        autoclear: 0,
        refcount_order: 4,
        header_length: 112,
        compression_type: 0,
        backing_file,
        backing_format: backing.map(|(_, f)| f.as_str().to_string()),
    };
    let head = h.encode_new();
    if head.len() as u64 > cs {
        return Err(DiskError::Invalid(format!(
            "the header and backing file name do not fit in one {cluster_size}-byte cluster; use a larger cluster size"
        )));
    }
    let file =
        OpenOptions::new().write(true).create_new(true).open(path).map_err(|e| DiskError::io(path, "create", e))?;
    let l1_clusters = (l1_size * 8).div_ceil(cs);
    let result = (|| {
        file.write_all_at(&head, 0).map_err(|e| DiskError::io(path, "write", e))?;
        let zeros = vec![0u8; ((1 + l1_clusters) * cs) as usize];
        file.write_all_at(&zeros, cs).map_err(|e| DiskError::io(path, "write", e))?;
        drop(file);
        let mut img = Qcow2::open(path, false, None)?;
        for c in 0..2 + l1_clusters {
            img.set_refcount(c, 1)?;
        }
        img.sync()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(path);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refcount_entries_round_trip_at_every_width() {
        for order in 0..=6u32 {
            let bits = 1u32 << order;
            let mut blk = vec![0u8; 512];
            let n = 512 * 8 / u64::from(bits);
            let max = if bits == 64 { u64::MAX } else { (1u64 << bits) - 1 };
            for i in 0..n {
                rc_set(&mut blk, i, bits, (i * 7) & max);
            }
            for i in 0..n {
                assert_eq!(rc_get(&blk, i, bits), (i * 7) & max, "bits {bits} index {i}");
            }
        }
    }
}
