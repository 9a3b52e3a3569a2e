//! `qemu-img check` for qcow2: recount every reference from the header, tables, snapshots and
//! L2 entries, compare with the stored refcounts and the active COPIED flags, and optionally
//! repair. A stored refcount above the references is a leak (space lost, data safe); below is a
//! corruption (a write could free or overwrite a cluster still in use).

use std::path::Path;

use serde::Serialize;

use crate::header::{INCOMPAT_CORRUPT, INCOMPAT_DIRTY};
use crate::qcow2::{Qcow2, COMPRESSED, COPIED, OFFSET_MASK, REFT_OFFSET_MASK};
use crate::{DiskError, Format};

/// What `check` may repair (`qemu-img check -r leaks|all`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RepairMode {
    #[default]
    None,
    /// Lower refcounts that are too high.
    Leaks,
    /// Also raise refcounts that are too low and fix COPIED flags.
    All,
}

/// The result of a check, with `qemu-img check --output=json` field names.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct CheckReport {
    pub filename: String,
    pub format: &'static str,
    /// Metadata that could not be read at all.
    pub check_errors: u64,
    pub leaks: u64,
    pub corruptions: u64,
    pub leaks_fixed: u64,
    pub corruptions_fixed: u64,
    pub image_end_offset: u64,
    pub total_clusters: u64,
    pub allocated_clusters: u64,
    pub fragmented_clusters: u64,
    /// One line per problem found (before any repair).
    #[serde(skip)]
    pub messages: Vec<String>,
}

impl CheckReport {
    /// True when nothing is wrong (after repair, if one was asked for).
    pub fn is_clean(&self) -> bool {
        self.check_errors == 0 && self.leaks == 0 && self.corruptions == 0
    }
}

/// Largest file `check` takes (512 MiB of counters; 16 TiB with 64 KiB clusters).
const MAX_CHECK_CLUSTERS: u64 = 1 << 27;

/// A refcount to correct: (cluster, right value, true if a leak).
type Fix = (u64, u64, bool);

struct Scan {
    report: CheckReport,
    fixes: Vec<Fix>,
    copied_wrong: bool,
}

/// A reference counter over the clusters of the file.
struct Refs {
    counts: Vec<u32>,
    cs: u64,
}

impl Refs {
    fn add(&mut self, off: u64, what: &str, r: &mut CheckReport) {
        match self.counts.get_mut((off / self.cs) as usize) {
            Some(c) => *c = c.saturating_add(1),
            None => {
                r.corruptions += 1;
                r.messages.push(format!("ERROR {what} at {off:#x} is outside the image file"));
            }
        }
    }
    fn add_range(&mut self, off: u64, bytes: u64, what: &str, r: &mut CheckReport) {
        for c in 0..bytes.div_ceil(self.cs) {
            self.add(off + c * self.cs, what, r);
        }
    }
}

fn scan(img: &mut Qcow2) -> Result<Scan, DiskError> {
    let cs = img.cs;
    let n = img.end / cs;
    let mut r = CheckReport {
        filename: img.path.display().to_string(),
        format: Format::Qcow2.as_str(),
        total_clusters: img.h.size.div_ceil(cs),
        ..Default::default()
    };
    if n > MAX_CHECK_CLUSTERS {
        return Err(DiskError::unsupported(
            &img.path,
            format!("checking a file of {n} clusters (the checker holds a counter per cluster; at most {MAX_CHECK_CLUSTERS})"),
        ));
    }
    let mut refs = Refs { counts: vec![0; n as usize], cs };
    refs.add(0, "header", &mut r);
    refs.add_range(img.h.l1_table_offset, img.l1.len() as u64 * 8, "L1 table", &mut r);
    refs.add_range(
        img.h.refcount_table_offset,
        u64::from(img.h.refcount_table_clusters) * cs,
        "refcount table",
        &mut r,
    );
    for (i, &e) in img.reftable.clone().iter().enumerate() {
        let off = e & REFT_OFFSET_MASK;
        if off == 0 {
            continue;
        }
        if off % cs != 0 {
            r.corruptions += 1;
            r.messages.push(format!("ERROR refcount block {i} at {off:#x} is not cluster-aligned"));
            continue;
        }
        refs.add(off, &format!("refcount block {i}"), &mut r);
    }
    if img.h.nb_snapshots > 0 {
        refs.add_range(img.h.snapshots_offset, img.snap_table_bytes, "snapshot table", &mut r);
    }
    let mut flags: Vec<(u64, bool)> = Vec::new();
    for s in img.snapshots.clone() {
        refs.add_range(s.l1_table_offset, u64::from(s.l1_size) * 8, "snapshot L1 table", &mut r);
        match img.read_snapshot_l1(&s) {
            Ok(l1) => walk(img, &l1, &mut refs, &mut r, None)?,
            Err(e) => {
                r.check_errors += 1;
                r.messages.push(format!("ERROR reading snapshot {}: {e}", s.name));
            }
        }
    }
    let active = img.l1.clone();
    walk(img, &active, &mut refs, &mut r, Some(&mut flags))?;

    let mut fixes = Vec::new();
    let mut c = 0u64;
    let covered = img.reftable.len() as u64 * img.rpb;
    while c < n.max(covered) {
        let block_has = img.reftable.get((c / img.rpb) as usize).is_some_and(|e| e & REFT_OFFSET_MASK != 0);
        if c >= n && !block_has {
            c = (c / img.rpb + 1) * img.rpb;
            continue;
        }
        let stored = match img.refcount(c) {
            Ok(v) => v,
            Err(e) => {
                r.check_errors += 1;
                r.messages.push(format!("ERROR cannot read the refcounts of clusters {c}..: {e}"));
                c = (c / img.rpb + 1) * img.rpb;
                continue;
            }
        };
        let expected = refs.counts.get(c as usize).copied().map_or(0, u64::from);
        if stored != expected {
            let leak = stored > expected;
            if leak {
                r.leaks += 1;
                r.messages.push(format!("Leaked cluster {c} refcount={stored} reference={expected}"));
            } else {
                r.corruptions += 1;
                r.messages.push(format!("ERROR cluster {c} refcount={stored} reference={expected}"));
            }
            fixes.push((c, expected, leak));
        }
        c += 1;
    }
    let mut copied_wrong = false;
    for (off, copied) in flags {
        let rc = refs.counts.get((off / cs) as usize).copied().unwrap_or(0);
        if copied != (rc == 1) {
            copied_wrong = true;
            r.corruptions += 1;
            r.messages.push(format!("ERROR OFLAG_COPIED: offset={off:#x} refcount={rc} copied={copied}"));
        }
    }
    let last = refs.counts.iter().rposition(|&v| v > 0).map_or(0, |i| i as u64 + 1);
    r.image_end_offset = last * cs;
    Ok(Scan { report: r, fixes, copied_wrong })
}

/// Counts the references an L1 table makes. For the active table, `flags` collects each
/// entry's (cluster offset, COPIED flag) for the COPIED check, and allocation is counted.
fn walk(
    img: &mut Qcow2,
    l1: &[u64],
    refs: &mut Refs,
    r: &mut CheckReport,
    mut flags: Option<&mut Vec<(u64, bool)>>,
) -> Result<(), DiskError> {
    let cs = img.cs;
    let mut prev_host = 0u64;
    for (i, &e) in l1.iter().enumerate() {
        let l2 = e & OFFSET_MASK;
        if l2 == 0 {
            continue;
        }
        if l2 % cs != 0 || l2 + cs > img.file_len {
            r.corruptions += 1;
            r.messages.push(format!("ERROR L1 entry {i}: L2 table at {l2:#x} is unaligned or outside the file"));
            continue;
        }
        refs.add(l2, "L2 table", r);
        if let Some(f) = flags.as_deref_mut() {
            f.push((l2, e & COPIED != 0));
        }
        let table = match img.l2_table(l2) {
            Ok(t) => t.clone(),
            Err(err) => {
                r.check_errors += 1;
                r.messages.push(format!("ERROR reading L2 table at {l2:#x}: {err}"));
                continue;
            }
        };
        for (j, &d) in table.iter().enumerate() {
            if d & COMPRESSED != 0 {
                let (off, len) = img.compressed_span(d);
                refs.add_range(off - off % cs, off % cs + len, "compressed cluster", r);
                if flags.is_some() {
                    r.allocated_clusters += 1;
                }
                continue;
            }
            let off = d & OFFSET_MASK;
            if off == 0 {
                continue;
            }
            if off % cs != 0 || off >= img.file_len {
                r.corruptions += 1;
                r.messages.push(format!(
                    "ERROR L2 table {l2:#x} entry {j}: data cluster {off:#x} is unaligned or outside the file"
                ));
                continue;
            }
            refs.add(off, "data cluster", r);
            if let Some(f) = flags.as_deref_mut() {
                f.push((off, d & COPIED != 0));
                r.allocated_clusters += 1;
                if prev_host != 0 && off != prev_host + cs {
                    r.fragmented_clusters += 1;
                }
                prev_host = off;
            }
        }
    }
    Ok(())
}

pub(crate) fn check(path: &Path, mode: RepairMode) -> Result<CheckReport, DiskError> {
    let mut img = Qcow2::open_with(path, mode == RepairMode::None, None, true)?;
    let first = scan(&mut img)?;
    if mode == RepairMode::None
        || first.report.is_clean() && img.h.incompatible & (INCOMPAT_DIRTY | INCOMPAT_CORRUPT) == 0
    {
        return Ok(first.report);
    }
    for &(c, right, leak) in &first.fixes {
        if leak || mode == RepairMode::All {
            img.set_refcount(c, right)?;
        }
    }
    if mode == RepairMode::All {
        if first.copied_wrong {
            img.recompute_copied()?;
        }
        img.h.incompatible &= !(INCOMPAT_DIRTY | INCOMPAT_CORRUPT);
        img.write_header()?;
    }
    img.sync()?;
    let after = scan(&mut img)?.report;
    let mut report = first.report;
    report.leaks_fixed = report.leaks.saturating_sub(after.leaks);
    report.corruptions_fixed = report.corruptions.saturating_sub(after.corruptions);
    report.leaks = after.leaks;
    report.corruptions = after.corruptions;
    report.check_errors = after.check_errors;
    report.image_end_offset = after.image_end_offset;
    report.allocated_clusters = after.allocated_clusters;
    report.fragmented_clusters = after.fragmented_clusters;
    Ok(report)
}
