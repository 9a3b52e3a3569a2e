//! `qemu-img convert`: copy a whole image (through its backing chain) into a new, standalone
//! image of either format, leaving zero blocks unwritten so the copy stays thin.

use std::path::Path;

use crate::{create, open, CreateOptions, DiskError, Format, OpenOptions};

/// Zero detection granularity: a block of this size that is all zeros is not written.
const BLOCK: usize = 64 << 10;
/// Bytes read per request.
const CHUNK: usize = 2 << 20;

/// Copies `src` (any format, read through its backing chain) to a new image `dst` in `format`.
/// `progress` is called with (bytes done, total). `dst` must not exist; it is removed on failure.
pub fn convert(
    src: &Path,
    dst: &Path,
    format: Format,
    cluster_size: Option<u32>,
    mut progress: impl FnMut(u64, u64),
) -> Result<(), DiskError> {
    let mut s = open(src, OpenOptions { read_only: true, format: None })?;
    let size = s.size();
    let mut opts = CreateOptions::new(format, size);
    opts.cluster_size = cluster_size;
    create(dst, &opts)?;
    let result = (|| {
        let mut d = open(dst, OpenOptions { read_only: false, format: Some(format) })?;
        let mut buf = vec![0u8; CHUNK];
        let mut off = 0u64;
        while off < size {
            let n = (size - off).min(CHUNK as u64) as usize;
            s.read_at(&mut buf[..n], off)?;
            for (i, block) in buf[..n].chunks(BLOCK).enumerate() {
                if block.iter().any(|&b| b != 0) {
                    d.write_at(block, off + (i * BLOCK) as u64)?;
                }
            }
            off += n as u64;
            progress(off, size);
        }
        d.flush()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(dst);
    }
    result
}
