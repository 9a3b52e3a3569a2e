//! qcow2 internal snapshots (`qemu-img snapshot -c/-l/-a/-d`).
//!
//! A snapshot is a copy of the active L1 table plus one more reference on every L2 table and
//! data cluster it reaches; the active image then copies a cluster on its first write (the
//! COPIED flags are cleared). Applying a snapshot makes a copy of its L1 table active again;
//! deleting one drops its references and frees what nothing else uses.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::header::{be32, be64, check_table, MAX_L1_BYTES};
use crate::qcow2::{be_u64s, u64s_be, Qcow2, COPIED};
use crate::{detect, DiskError, Format};

/// Longest extra data QEMU accepts in a snapshot table entry.
const MAX_EXTRA: u32 = 1024;
/// Largest snapshot table read (QEMU's limit).
const MAX_TABLE_BYTES: u64 = 64 << 20;

/// One snapshot table entry.
#[derive(Debug, Clone)]
pub(crate) struct Snapshot {
    pub l1_table_offset: u64,
    pub l1_size: u32,
    pub id: String,
    pub name: String,
    pub date_sec: u32,
    pub date_nsec: u32,
    pub vm_clock_nsec: u64,
    pub vm_state_size: u64,
    pub disk_size: u64,
    pub icount: Option<u64>,
    /// Extra data as stored (kept as is when the table is rewritten).
    pub extra: Vec<u8>,
}

/// A snapshot as `qemu-img info --output=json` lists it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct SnapshotInfo {
    pub id: String,
    pub name: String,
    pub vm_state_size: u64,
    pub date_sec: u32,
    pub date_nsec: u32,
    pub vm_clock_sec: u64,
    pub vm_clock_nsec: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub icount: Option<u64>,
    /// Virtual disk size when the snapshot was taken.
    #[serde(skip)]
    pub disk_size: u64,
}

impl Snapshot {
    pub(crate) fn info(&self) -> SnapshotInfo {
        SnapshotInfo {
            id: self.id.clone(),
            name: self.name.clone(),
            vm_state_size: self.vm_state_size,
            date_sec: self.date_sec,
            date_nsec: self.date_nsec,
            vm_clock_sec: self.vm_clock_nsec / 1_000_000_000,
            vm_clock_nsec: (self.vm_clock_nsec % 1_000_000_000) as u32,
            icount: self.icount,
            disk_size: self.disk_size,
        }
    }

    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.l1_table_offset.to_be_bytes());
        out.extend_from_slice(&self.l1_size.to_be_bytes());
        out.extend_from_slice(&(self.id.len() as u16).to_be_bytes());
        out.extend_from_slice(&(self.name.len() as u16).to_be_bytes());
        out.extend_from_slice(&self.date_sec.to_be_bytes());
        out.extend_from_slice(&self.date_nsec.to_be_bytes());
        out.extend_from_slice(&self.vm_clock_nsec.to_be_bytes());
        out.extend_from_slice(&(self.vm_state_size.min(u64::from(u32::MAX)) as u32).to_be_bytes());
        out.extend_from_slice(&(self.extra.len() as u32).to_be_bytes());
        out.extend_from_slice(&self.extra);
        out.extend_from_slice(self.id.as_bytes());
        out.extend_from_slice(self.name.as_bytes());
        out.resize(out.len().div_ceil(8) * 8, 0);
    }
}

/// Reads and validates the snapshot table; returns the entries and the bytes they take.
pub(crate) fn read_table(img: &Qcow2) -> Result<(Vec<Snapshot>, u64), DiskError> {
    let h = &img.h;
    let mut out = Vec::with_capacity(h.nb_snapshots.min(1024) as usize);
    let start = h.snapshots_offset;
    let mut at = start;
    for i in 0..h.nb_snapshots {
        let bad = |what: String| DiskError::corrupt(&img.path, format!("snapshot table entry {i}: {what}"));
        let mut fixed = [0u8; 40];
        img.pread(&mut fixed, at, "snapshot table")?;
        let id_len = u16::from_be_bytes([fixed[12], fixed[13]]) as usize;
        let name_len = u16::from_be_bytes([fixed[14], fixed[15]]) as usize;
        let extra_len = be32(&fixed, 36);
        if extra_len > MAX_EXTRA {
            return Err(bad(format!("{extra_len} bytes of extra data (at most {MAX_EXTRA})")));
        }
        let var_len = extra_len as usize + id_len + name_len;
        let mut var = vec![0u8; var_len];
        img.pread(&mut var, at + 40, "snapshot table")?;
        let extra = var[..extra_len as usize].to_vec();
        let text = |b: &[u8], what: &str| {
            String::from_utf8(b.to_vec())
                .map_err(|_| DiskError::corrupt(&img.path, format!("snapshot {i}: {what} is not UTF-8")))
        };
        let id = text(&var[extra_len as usize..extra_len as usize + id_len], "id")?;
        let name = text(&var[extra_len as usize + id_len..], "name")?;
        let l1_table_offset = be64(&fixed, 0);
        let l1_size = be32(&fixed, 8);
        if u64::from(l1_size) * 8 > MAX_L1_BYTES {
            return Err(bad(format!("L1 table of {l1_size} entries is above the limit")));
        }
        check_table(
            &img.path,
            &format!("snapshot {id:?} L1 table"),
            l1_table_offset,
            u64::from(l1_size) * 8,
            img.cs,
            img.file_len,
        )?;
        if img.h.version >= 3 && extra.len() < 16 {
            return Err(bad(format!("{} bytes of extra data; version 3 requires at least 16", extra.len())));
        }
        let snap = Snapshot {
            l1_table_offset,
            l1_size,
            id,
            name,
            date_sec: be32(&fixed, 16),
            date_nsec: be32(&fixed, 20),
            vm_clock_nsec: be64(&fixed, 24),
            vm_state_size: if extra.len() >= 8 { be64(&extra, 0) } else { u64::from(be32(&fixed, 32)) },
            disk_size: if extra.len() >= 16 { be64(&extra, 8) } else { img.h.size },
            icount: if extra.len() >= 24 { Some(be64(&extra, 16)).filter(|v| *v != u64::MAX) } else { None },
            extra,
        };
        if snap.disk_size > (1u64 << 62) {
            return Err(bad(format!("disk size {} is absurdly large", snap.disk_size)));
        }
        at += ((40 + var_len) as u64).div_ceil(8) * 8;
        if at - start > MAX_TABLE_BYTES {
            return Err(bad("the snapshot table is larger than 64 MiB".into()));
        }
        out.push(snap);
    }
    Ok((out, at - start))
}

impl Qcow2 {
    /// Writes `snaps` as the new snapshot table (in newly allocated clusters), points the header
    /// at it and frees the old one.
    fn write_snapshot_table(&mut self, snaps: Vec<Snapshot>) -> Result<(), DiskError> {
        let mut bytes = Vec::new();
        for s in &snaps {
            s.encode(&mut bytes);
        }
        let old_off = self.h.snapshots_offset;
        let old_clusters = if self.h.nb_snapshots == 0 { 0 } else { self.snap_table_bytes.div_ceil(self.cs) };
        let new_off = if snaps.is_empty() {
            0
        } else {
            let clusters = (bytes.len() as u64).div_ceil(self.cs);
            let off = self.alloc_contiguous(clusters)?;
            let mut padded = bytes.clone();
            padded.resize((clusters * self.cs) as usize, 0);
            self.pwrite(&padded, off)?;
            off
        };
        self.h.snapshots_offset = new_off;
        self.h.nb_snapshots = snaps.len() as u32;
        self.write_header()?;
        for c in 0..old_clusters {
            self.decref(old_off + c * self.cs)?;
        }
        self.snap_table_bytes = bytes.len() as u64;
        self.snapshots = snaps;
        Ok(())
    }

    fn find_snapshot(&self, key: &str) -> Result<usize, DiskError> {
        self.snapshots
            .iter()
            .position(|s| s.id == key)
            .or_else(|| self.snapshots.iter().position(|s| s.name == key))
            .ok_or_else(|| DiskError::Invalid(format!("{}: no snapshot with id or name `{key}`", self.path.display())))
    }

    pub(crate) fn read_snapshot_l1(&self, s: &Snapshot) -> Result<Vec<u64>, DiskError> {
        let mut b = vec![0u8; s.l1_size as usize * 8];
        self.pread(&mut b, s.l1_table_offset, "snapshot L1 table")?;
        Ok(be_u64s(&b))
    }

    fn snapshot_create(&mut self, name: &str) -> Result<(), DiskError> {
        if name.is_empty() || name.len() > 1024 {
            return Err(DiskError::Invalid("a snapshot name must be 1 to 1024 bytes long".into()));
        }
        if self.snapshots.iter().any(|s| s.name == name || s.id == name) {
            return Err(DiskError::Invalid(format!(
                "{}: a snapshot named `{name}` already exists",
                self.path.display()
            )));
        }
        if self.snapshots.len() as u32 >= crate::header::MAX_SNAPSHOTS {
            return Err(DiskError::Invalid(format!(
                "{}: the image has the most snapshots allowed",
                self.path.display()
            )));
        }
        let id = self.snapshots.iter().filter_map(|s| s.id.parse::<u64>().ok()).max().unwrap_or(0) + 1;
        let l1 = self.l1.clone();
        self.l1_refs(&l1, true)?;
        let clusters = (l1.len() as u64 * 8).div_ceil(self.cs);
        let l1_off = if clusters == 0 { 0 } else { self.alloc_contiguous(clusters)? };
        if clusters > 0 {
            let stripped: Vec<u64> = l1.iter().map(|e| e & !COPIED).collect();
            let mut b = u64s_be(&stripped);
            b.resize((clusters * self.cs) as usize, 0);
            self.pwrite(&b, l1_off)?;
        }
        self.recompute_copied()?;
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let mut extra = Vec::with_capacity(16);
        extra.extend_from_slice(&0u64.to_be_bytes());
        extra.extend_from_slice(&self.h.size.to_be_bytes());
        let mut snaps = self.snapshots.clone();
        snaps.push(Snapshot {
            l1_table_offset: l1_off,
            l1_size: l1.len() as u32,
            id: id.to_string(),
            name: name.to_string(),
            date_sec: now.as_secs() as u32,
            date_nsec: now.subsec_nanos(),
            vm_clock_nsec: 0,
            vm_state_size: 0,
            disk_size: self.h.size,
            icount: None,
            extra,
        });
        self.write_snapshot_table(snaps)?;
        self.sync()
    }

    fn snapshot_apply(&mut self, key: &str) -> Result<(), DiskError> {
        let s = self.snapshots[self.find_snapshot(key)?].clone();
        if s.vm_state_size != 0 {
            tracing::info!(
                "snapshot `{}` has {} bytes of VM state; only the disk is restored",
                s.name,
                s.vm_state_size
            );
        }
        let snap_l1 = self.read_snapshot_l1(&s)?;
        let need = (crate::header::l1_entries_for(s.disk_size, self.h.cluster_bits)).max(snap_l1.len() as u64);
        if need > self.l1.len() as u64 {
            self.grow_l1(need)?;
        }
        let mut new_l1: Vec<u64> = snap_l1.iter().map(|e| e & !COPIED).collect();
        new_l1.resize(self.l1.len(), 0);
        self.l1_refs(&new_l1, true)?;
        let old = std::mem::replace(&mut self.l1, new_l1);
        self.write_l1_table()?;
        self.l1_refs(&old, false)?;
        self.h.size = s.disk_size;
        self.write_header()?;
        self.recompute_copied()?;
        self.sync()
    }

    fn snapshot_delete(&mut self, key: &str) -> Result<(), DiskError> {
        let idx = self.find_snapshot(key)?;
        let mut snaps = self.snapshots.clone();
        let s = snaps.remove(idx);
        let snap_l1 = self.read_snapshot_l1(&s)?;
        self.write_snapshot_table(snaps)?;
        self.l1_refs(&snap_l1, false)?;
        let clusters = (u64::from(s.l1_size) * 8).div_ceil(self.cs);
        for c in 0..clusters {
            self.decref(s.l1_table_offset + c * self.cs)?;
        }
        self.recompute_copied()?;
        self.sync()
    }
}

fn open_qcow2(path: &Path, read_only: bool) -> Result<Qcow2, DiskError> {
    if detect(path)? != Format::Qcow2 {
        return Err(DiskError::Unsupported {
            path: path.to_path_buf(),
            what: "internal snapshots need a qcow2 image; this one is raw".into(),
        });
    }
    Qcow2::open(path, read_only, None)
}

/// Takes an internal snapshot of the disk's current state (`qemu-img snapshot -c NAME`).
pub fn create(path: &Path, name: &str) -> Result<(), DiskError> {
    open_qcow2(path, false)?.snapshot_create(name)
}

/// Lists the snapshots (`qemu-img snapshot -l`).
pub fn list(path: &Path) -> Result<Vec<SnapshotInfo>, DiskError> {
    Ok(open_qcow2(path, true)?.snapshots.iter().map(Snapshot::info).collect())
}

/// Reverts the disk to a snapshot, found by id or name (`qemu-img snapshot -a`). The snapshot is
/// kept; what was written since it was taken is lost.
pub fn apply(path: &Path, id_or_name: &str) -> Result<(), DiskError> {
    open_qcow2(path, false)?.snapshot_apply(id_or_name)
}

/// Deletes a snapshot, found by id or name (`qemu-img snapshot -d`), freeing the clusters only it used.
pub fn delete(path: &Path, id_or_name: &str) -> Result<(), DiskError> {
    open_qcow2(path, false)?.snapshot_delete(id_or_name)
}
