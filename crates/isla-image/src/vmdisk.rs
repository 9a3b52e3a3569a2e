//! ext4 disk images of images' root file systems, for booting a container image as a microVM.
//!
//! `vmdisks/<config digest hex>-v1.ext4` holds one read-only base disk per image configuration
//! (which names the layers, so equal configurations mean equal root file systems). It is built
//! once with `mkfs.ext4 -d` from the image's root mounted as an overlay (so whiteouts are
//! already applied), in `tmp/`, and renamed into place; instances put their own qcow2 overlay
//! on it. [`Store::gc`] removes the disks of images that are gone; an instance keeps its base
//! alive by a hard link of its own, so collection never pulls a disk from under a guest.
//!
//! Size: the content (allocated blocks of every file, hard links once) plus a quarter for ext4's
//! metadata, 256 bytes per inode, and [`HEADROOM`] of free space for what the container writes;
//! the file is sparse, so the headroom costs nothing until written. Inodes: the files plus a
//! quarter plus 1,024. Images whose disk would exceed [`MAX_DISK`], or whose content does not
//! fit the store's free space, are refused before anything is written.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use rustix::fs::OFlags;

use crate::error::{Error, IoContext, Result};
use crate::store::{Image, Store};

/// Directory of the base disks, under the store's root.
pub const DIR: &str = "vmdisks";
/// Suffix of a base disk's file name; changes when the way disks are made changes.
const SUFFIX: &str = "-v1.ext4";
/// Free space in a new disk for the container's own writes.
pub const HEADROOM: u64 = 256 << 20;
/// Largest disk made for an image.
pub const MAX_DISK: u64 = 64 << 30;

/// What a disk for some content needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskPlan {
    /// Bytes the files occupy.
    pub content: u64,
    /// Files, directories and links (hard links once).
    pub files: u64,
    /// Size of the ext4 file system, bytes (whole MiB).
    pub size: u64,
    /// Inodes to make.
    pub inodes: u64,
}

/// Sizes a disk for `content` bytes in `files` inodes, given `free` bytes on the store's file
/// system; a clear error when it cannot be made.
pub fn plan(content: u64, files: u64, free: u64) -> Result<DiskPlan> {
    let inodes = files + files / 4 + 1024;
    let size = (content + content / 4 + inodes * 256 + HEADROOM).div_ceil(1 << 20) << 20;
    let mib = |b: u64| b.div_ceil(1 << 20);
    if size > MAX_DISK {
        return Err(Error::invalid(
            "microVM disk",
            format!(
                "the image holds {} MiB in {files} files; its disk would be {} MiB, more than the {} MiB \
                 a microVM disk may have (run it as a container instead)",
                mib(content),
                mib(size),
                mib(MAX_DISK)
            ),
        ));
    }
    // Only what is written takes space: the content and ext4's metadata, not the headroom.
    let needed = content + content / 4 + inodes * 256 + (16 << 20);
    if needed > free {
        return Err(Error::invalid(
            "microVM disk",
            format!(
                "the image's disk needs about {} MiB, but the image store's file system has {} MiB free",
                mib(needed),
                mib(free)
            ),
        ));
    }
    Ok(DiskPlan { content, files, size, inodes })
}

/// Allocated bytes and inodes under `dir` (not following symbolic links, hard links once).
pub fn measure(dir: &Path) -> Result<(u64, u64)> {
    let mut seen = BTreeSet::new();
    let mut stack = vec![dir.to_path_buf()];
    let (mut bytes, mut files) = (0u64, 0u64);
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).at(&d)? {
            let e = e.at(&d)?;
            let m = e.metadata().at(&e.path())?;
            if m.nlink() > 1 && !m.is_dir() && !seen.insert((m.dev(), m.ino())) {
                continue;
            }
            files += 1;
            bytes += m.blocks() * 512;
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    Ok((bytes, files + 1))
}

/// Finds `prog` in the image mounted at `root` as `execvp` would there: a name with a slash as
/// is, any other in each directory of `path`; symbolic links resolve inside `root`. The path
/// inside the image, if it names an executable regular file.
pub fn find_program(root: &Path, prog: &str, path: &str) -> Result<Option<String>> {
    let dir = fs::File::open(root).at(root)?;
    let candidates: Vec<String> = if prog.contains('/') {
        vec![prog.to_string()]
    } else {
        path.split(':').filter(|d| !d.is_empty()).map(|d| format!("{}/{prog}", d.trim_end_matches('/'))).collect()
    };
    for c in candidates {
        let Ok(fd) = crate::run::open_in_root(&dir, &c, OFlags::PATH) else { continue };
        let Ok(st) = rustix::fs::fstat(&fd) else { continue };
        if rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::RegularFile
            && st.st_mode & 0o111 != 0
        {
            return Ok(Some(c));
        }
    }
    Ok(None)
}

/// Free bytes for an unprivileged writer on the file system holding `p`.
fn free_space(p: &Path) -> Result<u64> {
    let st = rustix::fs::statvfs(p).at(p)?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Makes the ext4 file `out` from the tree `src` as `plan` says (`mkfs.ext4 -d`, e2fsprogs).
pub fn make_ext4(src: &Path, out: &Path, plan: &DiskPlan) -> Result<()> {
    let o = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "isla-image", "-N", &plan.inodes.to_string(), "-d"])
        .arg(src)
        .arg(out)
        .arg(format!("{}k", plan.size >> 10))
        .output()
        .map_err(|e| {
            Error::invalid("mkfs.ext4", format!("cannot run it ({e}); install e2fsprogs (apt-get install e2fsprogs)"))
        })?;
    if !o.status.success() {
        return Err(Error::invalid(
            format!("mkfs.ext4 -d {}", src.display()),
            format!("{}: {}", o.status, String::from_utf8_lossy(&o.stderr).trim()),
        ));
    }
    Ok(())
}

impl Store {
    /// Where the base disk of `img` is (or will be) cached.
    pub fn vm_disk_path(&self, img: &Image) -> Result<PathBuf> {
        let hex = crate::digest::sha256_hex(img.manifest.config().digest())?;
        Ok(self.root().join(DIR).join(format!("{hex}{SUFFIX}")))
    }

    /// Mounts `img`'s root file system (an overlay of its layers, on a temporary directory),
    /// runs `f` with its path, and unmounts and deletes it again, also when `f` fails.
    pub fn with_image_root<T>(&self, img: &Image, f: impl FnOnce(&Path) -> Result<T>) -> Result<T> {
        let id = crate::store::unique("vmroot");
        let m = self.prepare_rootfs(img.digest.as_ref(), &id)?;
        let r = m.mount().and_then(|()| f(&m.merged));
        let cleanup = self.remove_rootfs(&id);
        let t = r?;
        cleanup?;
        Ok(t)
    }

    /// The base disk of `img`, built from its root file system mounted at `root` unless cached.
    /// Returns the path and whether it was built now.
    pub fn vm_disk(&self, img: &Image, root: &Path) -> Result<(PathBuf, bool)> {
        let path = self.vm_disk_path(img)?;
        if path.is_file() {
            return Ok((path, false));
        }
        let (content, files) = measure(root)?;
        let plan = plan(content, files, free_space(self.root())?)?;
        let _w = self.writer_lock()?;
        let tmp = self.staged("vmdisk");
        make_ext4(root, &tmp.path, &plan)?;
        fs::set_permissions(&tmp.path, fs::Permissions::from_mode(0o444)).at(&tmp.path)?;
        fs::File::open(&tmp.path).and_then(|f| f.sync_all()).at(&tmp.path)?;
        let dir = self.root().join(DIR);
        fs::create_dir_all(&dir).at(&dir)?;
        // Two builders of one image both rename a complete disk into place: the last one wins.
        fs::rename(&tmp.path, &path).at(&path)?;
        tmp.keep();
        crate::store::fsync_dir(&dir)?;
        Ok((path, true))
    }
}

/// Whether the base disk named `file_name` belongs to one of the configurations in `live`
/// (hex digests); anything else in [`DIR`] is garbage.
pub(crate) fn is_live(file_name: &str, live: &BTreeSet<String>) -> bool {
    file_name.strip_suffix(SUFFIX).is_some_and(|hex| live.contains(hex))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_leave_headroom_and_refuse_what_cannot_fit() {
        let p = plan(10 << 20, 500, 100 << 30).unwrap();
        assert_eq!(p.size % (1 << 20), 0);
        assert!(p.size >= (10 << 20) + HEADROOM);
        assert_eq!(p.inodes, 500 + 125 + 1024);
        let e = plan(60 << 30, 10, 1 << 40).unwrap_err().to_string();
        assert!(e.contains("more than the 65536 MiB"), "{e}");
        let e = plan(1 << 30, 10, 100 << 20).unwrap_err().to_string();
        assert!(e.contains("100 MiB free"), "{e}");
    }

    #[test]
    fn live_disks_are_named_by_their_configuration() {
        let live: BTreeSet<String> = ["ab12".to_string()].into();
        assert!(is_live("ab12-v1.ext4", &live));
        assert!(!is_live("ab12-v0.ext4", &live));
        assert!(!is_live("cd34-v1.ext4", &live));
        assert!(!is_live(".tmp", &live));
    }
}
