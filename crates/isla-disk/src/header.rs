//! The qcow2 header: parsing with validation of every field a hostile file controls, and encoding
//! (see QEMU's `docs/interop/qcow2.txt`). All numbers are big-endian.

use std::path::Path;

use crate::DiskError;

pub(crate) const QCOW_MAGIC: [u8; 4] = *b"QFI\xfb";
/// Length of the version 2 header and of the fixed part of the version 3 header.
pub(crate) const V2_HEADER_LEN: usize = 72;
pub(crate) const V3_HEADER_LEN: usize = 104;
/// QEMU's limits, which keep in-memory tables bounded for any file.
pub(crate) const MAX_L1_BYTES: u64 = 32 << 20;
pub(crate) const MAX_REFTABLE_BYTES: u64 = 8 << 20;
pub(crate) const MAX_SNAPSHOTS: u32 = 65536;
pub(crate) const MAX_BACKING_NAME: u32 = 1023;

pub(crate) const INCOMPAT_DIRTY: u64 = 1 << 0;
pub(crate) const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub(crate) const INCOMPAT_DATA_FILE: u64 = 1 << 2;
pub(crate) const INCOMPAT_COMPRESSION: u64 = 1 << 3;
pub(crate) const INCOMPAT_EXTL2: u64 = 1 << 4;
pub(crate) const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;

pub(crate) const EXT_END: u32 = 0;
pub(crate) const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
pub(crate) const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
pub(crate) const EXT_CRYPTO: u32 = 0x0537_be77;
pub(crate) const EXT_DATA_FILE: u32 = 0x4441_5441;

#[derive(Debug, Clone)]
pub(crate) struct Header {
    pub version: u32,
    pub backing_file_offset: u64,
    pub backing_file_size: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub crypt_method: u32,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible: u64,
    pub compatible: u64,
    pub autoclear: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    /// 0 = deflate (zlib), 1 = zstd.
    pub compression_type: u8,
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
}

pub(crate) fn be32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(a)
}

pub(crate) fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

/// Number of L1 entries needed for a virtual size.
pub(crate) fn l1_entries_for(size: u64, cluster_bits: u32) -> u64 {
    let per_l1 = 1u64 << (2 * cluster_bits - 3);
    size.div_ceil(per_l1)
}

impl Header {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Parses and validates the header. `buf` is the start of the file (its first cluster, or the
    /// whole file if shorter); `file_len` the file's length.
    pub fn parse(path: &Path, buf: &[u8], file_len: u64) -> Result<Header, DiskError> {
        let bad = |what: String| DiskError::corrupt(path, what);
        if buf.len() < V2_HEADER_LEN {
            return Err(bad(format!("file is {} bytes long, too short for a qcow2 header (72 bytes)", buf.len())));
        }
        if buf[..4] != QCOW_MAGIC {
            return Err(bad("no qcow2 magic".into()));
        }
        let version = be32(buf, 4);
        if version != 2 && version != 3 {
            return Err(DiskError::unsupported(path, format!("qcow2 version {version} (only 2 and 3 exist)")));
        }
        let cluster_bits = be32(buf, 20);
        if !(9..=21).contains(&cluster_bits) {
            return Err(bad(format!("cluster_bits {cluster_bits} is outside 9..=21")));
        }
        let cs = 1u64 << cluster_bits;
        let mut h = Header {
            version,
            backing_file_offset: be64(buf, 8),
            backing_file_size: be32(buf, 16),
            cluster_bits,
            size: be64(buf, 24),
            crypt_method: be32(buf, 32),
            l1_size: be32(buf, 36),
            l1_table_offset: be64(buf, 40),
            refcount_table_offset: be64(buf, 48),
            refcount_table_clusters: be32(buf, 56),
            nb_snapshots: be32(buf, 60),
            snapshots_offset: be64(buf, 64),
            incompatible: 0,
            compatible: 0,
            autoclear: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN as u32,
            compression_type: 0,
            backing_file: None,
            backing_format: None,
        };
        if version == 3 {
            if buf.len() < V3_HEADER_LEN {
                return Err(bad(format!(
                    "file is {} bytes long, too short for a qcow2 v3 header (104 bytes)",
                    buf.len()
                )));
            }
            h.incompatible = be64(buf, 72);
            h.compatible = be64(buf, 80);
            h.autoclear = be64(buf, 88);
            h.refcount_order = be32(buf, 96);
            h.header_length = be32(buf, 100);
            let hl = u64::from(h.header_length);
            if hl < V3_HEADER_LEN as u64 || hl % 8 != 0 || hl > cs || hl > buf.len() as u64 {
                return Err(bad(format!(
                    "header_length {hl} must be a multiple of 8 between 104 and the cluster size"
                )));
            }
            if hl > V3_HEADER_LEN as u64 {
                h.compression_type = buf[V3_HEADER_LEN];
            }
        }
        if h.refcount_order > 6 {
            return Err(bad(format!("refcount_order {} is above 6 (64-bit refcounts)", h.refcount_order)));
        }
        if h.crypt_method != 0 {
            return Err(DiskError::unsupported(path, "encrypted images; decrypt with `qemu-img convert` first"));
        }
        let known = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_COMPRESSION;
        if h.incompatible & INCOMPAT_DATA_FILE != 0 {
            return Err(DiskError::unsupported(path, "external data files (incompatible feature bit 2)"));
        }
        if h.incompatible & INCOMPAT_EXTL2 != 0 {
            return Err(DiskError::unsupported(path, "extended L2 entries (subclusters, incompatible feature bit 4)"));
        }
        if h.incompatible & !known != 0 {
            return Err(DiskError::unsupported(
                path,
                format!("unknown incompatible feature bits {:#x}", h.incompatible & !known),
            ));
        }
        if h.incompatible & INCOMPAT_COMPRESSION == 0 && h.compression_type != 0 {
            return Err(bad(format!(
                "compression_type {} without the compression-type feature bit",
                h.compression_type
            )));
        }
        if h.compression_type > 1 {
            return Err(bad(format!("unknown compression_type {}", h.compression_type)));
        }
        // Virtual size and L1 table.
        if h.size > (1u64 << 62) {
            return Err(bad(format!("virtual size {} is absurdly large", h.size)));
        }
        let need = l1_entries_for(h.size, cluster_bits);
        let l1_bytes = u64::from(h.l1_size) * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(bad(format!("l1_size {} is above the limit of {} entries", h.l1_size, MAX_L1_BYTES / 8)));
        }
        if u64::from(h.l1_size) < need {
            return Err(bad(format!(
                "l1_size {} is too small for the virtual size {} ({need} needed)",
                h.l1_size, h.size
            )));
        }
        check_table(path, "L1 table", h.l1_table_offset, l1_bytes, cs, file_len)?;
        // Refcount table.
        let rt_bytes = u64::from(h.refcount_table_clusters) * cs;
        if rt_bytes == 0 || rt_bytes > MAX_REFTABLE_BYTES {
            return Err(bad(format!(
                "refcount_table_clusters {} gives a refcount table outside 1 cluster..8 MiB",
                h.refcount_table_clusters
            )));
        }
        check_table(path, "refcount table", h.refcount_table_offset, rt_bytes, cs, file_len)?;
        if h.nb_snapshots > MAX_SNAPSHOTS {
            return Err(bad(format!("nb_snapshots {} is above the limit of {MAX_SNAPSHOTS}", h.nb_snapshots)));
        }
        if h.nb_snapshots > 0 {
            check_table(path, "snapshot table", h.snapshots_offset, 40, cs, file_len)?;
        }
        // Backing file name: within the first cluster.
        if h.backing_file_offset != 0 {
            let end = h.backing_file_offset.checked_add(u64::from(h.backing_file_size));
            if h.backing_file_size > MAX_BACKING_NAME || end.is_none_or(|e| e > cs || e > buf.len() as u64) {
                return Err(bad(format!(
                    "backing file name at {} ({} bytes) is not inside the first cluster or longer than {MAX_BACKING_NAME} bytes",
                    h.backing_file_offset, h.backing_file_size
                )));
            }
            let s = h.backing_file_offset as usize;
            let name = &buf[s..s + h.backing_file_size as usize];
            let name = std::str::from_utf8(name).map_err(|_| bad("backing file name is not UTF-8".into()))?;
            if name.is_empty() || name.contains('\0') {
                return Err(bad("backing file name is empty or contains NUL".into()));
            }
            h.backing_file = Some(name.to_string());
        }
        h.parse_extensions(path, buf)?;
        Ok(h)
    }

    fn parse_extensions(&mut self, path: &Path, buf: &[u8]) -> Result<(), DiskError> {
        let mut at = self.header_length as usize;
        let limit =
            if self.backing_file_offset != 0 { (self.backing_file_offset as usize).min(buf.len()) } else { buf.len() };
        while at + 8 <= limit {
            let kind = be32(buf, at);
            let len = be32(buf, at + 4) as usize;
            if kind == EXT_END {
                return Ok(());
            }
            let data_end = at + 8 + len;
            if data_end > limit {
                return Err(DiskError::corrupt(
                    path,
                    format!("header extension {kind:#x} at {at} runs past the header"),
                ));
            }
            let data = &buf[at + 8..data_end];
            match kind {
                EXT_BACKING_FORMAT => {
                    let s = std::str::from_utf8(data)
                        .map_err(|_| DiskError::corrupt(path, "backing format extension is not UTF-8"))?;
                    self.backing_format = Some(s.trim_end_matches('\0').to_string());
                }
                EXT_CRYPTO => return Err(DiskError::unsupported(path, "encrypted images (LUKS header extension)")),
                EXT_DATA_FILE => return Err(DiskError::unsupported(path, "external data files")),
                _ => {}
            }
            at = data_end.div_ceil(8) * 8;
        }
        Ok(())
    }

    /// The fixed part of the header (72 bytes for v2, 104 for v3), for rewriting in place.
    pub fn encode_fixed(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(V3_HEADER_LEN);
        b.extend_from_slice(&QCOW_MAGIC);
        b.extend_from_slice(&self.version.to_be_bytes());
        b.extend_from_slice(&self.backing_file_offset.to_be_bytes());
        b.extend_from_slice(&self.backing_file_size.to_be_bytes());
        b.extend_from_slice(&self.cluster_bits.to_be_bytes());
        b.extend_from_slice(&self.size.to_be_bytes());
        b.extend_from_slice(&self.crypt_method.to_be_bytes());
        b.extend_from_slice(&self.l1_size.to_be_bytes());
        b.extend_from_slice(&self.l1_table_offset.to_be_bytes());
        b.extend_from_slice(&self.refcount_table_offset.to_be_bytes());
        b.extend_from_slice(&self.refcount_table_clusters.to_be_bytes());
        b.extend_from_slice(&self.nb_snapshots.to_be_bytes());
        b.extend_from_slice(&self.snapshots_offset.to_be_bytes());
        if self.version >= 3 {
            b.extend_from_slice(&self.incompatible.to_be_bytes());
            b.extend_from_slice(&self.compatible.to_be_bytes());
            b.extend_from_slice(&self.autoclear.to_be_bytes());
            b.extend_from_slice(&self.refcount_order.to_be_bytes());
            b.extend_from_slice(&self.header_length.to_be_bytes());
        }
        b
    }

    /// A whole new header cluster: fixed fields, compression type, backing format and feature
    /// name extensions, and the backing file name after them. Sets `backing_file_offset`/`size`.
    pub fn encode_new(&mut self) -> Vec<u8> {
        let cs = self.cluster_size() as usize;
        self.header_length = 112;
        let mut ext = Vec::new();
        fn push_ext(ext: &mut Vec<u8>, kind: u32, data: &[u8]) {
            ext.extend_from_slice(&kind.to_be_bytes());
            ext.extend_from_slice(&(data.len() as u32).to_be_bytes());
            ext.extend_from_slice(data);
            ext.resize(ext.len().div_ceil(8) * 8, 0);
        }
        if let Some(f) = &self.backing_format {
            push_ext(&mut ext, EXT_BACKING_FORMAT, f.as_bytes());
        }
        let mut names = Vec::new();
        for (kind, bit, name) in [
            (0u8, 0u8, "dirty bit"),
            (0, 1, "corrupt bit"),
            (0, 2, "external data file"),
            (0, 3, "compression type"),
            (0, 4, "extended L2 entries"),
            (1, 0, "lazy refcounts"),
            (2, 0, "bitmaps"),
            (2, 1, "raw external data"),
        ] {
            let mut e = [0u8; 48];
            e[0] = kind;
            e[1] = bit;
            e[2..2 + name.len()].copy_from_slice(name.as_bytes());
            names.extend_from_slice(&e);
        }
        let backing_len = self.backing_file.as_ref().map_or(0, |b| b.len());
        // The feature name table is optional: leave it out where it would not fit the cluster.
        if 112 + ext.len() + 8 + names.len() + 8 + backing_len <= cs {
            push_ext(&mut ext, EXT_FEATURE_TABLE, &names);
        }
        push_ext(&mut ext, EXT_END, &[]);
        let name_at = 112 + ext.len();
        match &self.backing_file {
            Some(b) => {
                self.backing_file_offset = name_at as u64;
                self.backing_file_size = b.len() as u32;
            }
            None => {
                self.backing_file_offset = 0;
                self.backing_file_size = 0;
            }
        }
        let mut out = self.encode_fixed();
        out.push(self.compression_type);
        out.resize(112, 0);
        out.extend_from_slice(&ext);
        if let Some(b) = &self.backing_file {
            out.extend_from_slice(b.as_bytes());
        }
        out.resize(cs.max(out.len()), 0);
        out
    }
}

/// Checks that a table at `offset` of `bytes` bytes is cluster-aligned and inside the file.
pub(crate) fn check_table(
    path: &Path,
    what: &str,
    offset: u64,
    bytes: u64,
    cs: u64,
    file_len: u64,
) -> Result<(), DiskError> {
    if bytes == 0 {
        return Ok(());
    }
    if offset == 0 || offset % cs != 0 {
        return Err(DiskError::corrupt(
            path,
            format!("{what} offset {offset:#x} is not a non-zero multiple of the cluster size"),
        ));
    }
    match offset.checked_add(bytes) {
        Some(end) if end <= file_len => Ok(()),
        _ => Err(DiskError::corrupt(
            path,
            format!("{what} at {offset:#x} ({bytes} bytes) lies outside the file ({file_len} bytes); the file may be truncated"),
        )),
    }
}
