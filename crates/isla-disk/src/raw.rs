//! Raw images: the file is the disk. Sparse on creation; discard punches holes.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use rustix::fs::{fallocate, FallocateFlags};

use crate::{check_range, BlockBackend, DiskError};

pub(crate) struct Raw {
    path: PathBuf,
    file: File,
    size: u64,
    read_only: bool,
}

impl Raw {
    pub(crate) fn open(path: &Path, read_only: bool) -> Result<Raw, DiskError> {
        let file =
            OpenOptions::new().read(true).write(!read_only).open(path).map_err(|e| DiskError::io(path, "open", e))?;
        crate::lock(&file, path, !read_only)?;
        let size = file.metadata().map_err(|e| DiskError::io(path, "stat", e))?.len();
        Ok(Raw { path: path.to_path_buf(), file, size, read_only })
    }

    fn writable(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        if self.read_only {
            return Err(DiskError::ReadOnly { path: self.path.clone() });
        }
        check_range(offset, len, self.size)
    }

    /// Writes zeros through the page cache (where fallocate cannot).
    fn write_zero_bytes(&mut self, mut offset: u64, len: u64) -> Result<(), DiskError> {
        let zeros = vec![0u8; 1 << 20];
        let end = offset + len;
        while offset < end {
            let n = (end - offset).min(zeros.len() as u64) as usize;
            self.file.write_all_at(&zeros[..n], offset).map_err(|e| DiskError::io(&self.path, "write", e))?;
            offset += n as u64;
        }
        Ok(())
    }
}

impl BlockBackend for Raw {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        check_range(offset, buf.len() as u64, self.size)?;
        self.file.read_exact_at(buf, offset).map_err(|e| DiskError::io(&self.path, "read", e))
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<(), DiskError> {
        self.writable(offset, buf.len() as u64)?;
        self.file.write_all_at(buf, offset).map_err(|e| DiskError::io(&self.path, "write", e))
    }
    fn flush(&mut self) -> Result<(), DiskError> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync_data().map_err(|e| DiskError::io(&self.path, "fsync", e))
    }
    fn discard(&mut self, offset: u64, len: u64) -> Result<(), DiskError> {
        self.writable(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        // A file system without hole punching keeps the data: discard is advisory.
        let _ = fallocate(&self.file, FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE, offset, len);
        Ok(())
    }
    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), DiskError> {
        self.writable(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        match fallocate(&self.file, FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE, offset, len) {
            Ok(()) => Ok(()),
            Err(_) => self.write_zero_bytes(offset, len),
        }
    }
}

/// Creates a sparse raw image of `size` bytes.
pub(crate) fn create(path: &Path, size: u64) -> Result<(), DiskError> {
    let file =
        OpenOptions::new().write(true).create_new(true).open(path).map_err(|e| DiskError::io(path, "create", e))?;
    file.set_len(size).map_err(|e| DiskError::io(path, "set size", e))
}

pub(crate) fn resize(path: &Path, size: u64) -> Result<(), DiskError> {
    let file = OpenOptions::new().write(true).open(path).map_err(|e| DiskError::io(path, "open", e))?;
    crate::lock(&file, path, true)?;
    file.set_len(size).map_err(|e| DiskError::io(path, "set size", e))
}
