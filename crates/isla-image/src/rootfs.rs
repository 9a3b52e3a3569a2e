//! Container root filesystems: overlayfs over the image's unpacked layers, with a writable upper
//! directory per container.
//!
//! The mount options carry every lower directory in one string, which the kernel limits to a
//! page. When the plain paths do not fit, each lower directory is opened and passed as
//! `/proc/self/fd/N` (17 bytes each, so about 200 layers fit; overlayfs itself allows 500); the
//! descriptors are closed once the mount is made.

use std::ffi::CString;
use std::fs;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{Mode, OFlags};
use rustix::mount::{MountFlags, UnmountFlags};
use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};
use crate::store::{Image, Store};

/// The kernel copies at most one page of mount options.
const MAX_OPTIONS: usize = 4000;

/// The directories of one container's root filesystem.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RootfsMount {
    pub id: String,
    /// Manifest digest of the image.
    pub image: String,
    /// Unpacked layers, topmost first (overlayfs `lowerdir` order).
    pub lower: Vec<PathBuf>,
    pub upper: PathBuf,
    pub work: PathBuf,
    pub merged: PathBuf,
    /// diff_ids of the lower layers (keeps them from garbage collection while the container exists).
    pub diff_ids: Vec<String>,
}

impl RootfsMount {
    /// Lower directories, upper, work and merged as given; for build steps and tests.
    pub fn new(id: &str, lower: Vec<PathBuf>, dir: &Path) -> RootfsMount {
        RootfsMount {
            id: id.to_string(),
            image: String::new(),
            lower,
            upper: dir.join("upper"),
            work: dir.join("work"),
            merged: dir.join("merged"),
            diff_ids: vec![],
        }
    }

    fn create_dirs(&self) -> Result<()> {
        for d in [&self.upper, &self.work, &self.merged] {
            fs::create_dir_all(d).at(d)?;
        }
        Ok(())
    }

    /// The overlay mount options; opens the lower directories when the paths are too long.
    fn options(&self, fds: &mut Vec<OwnedFd>) -> Result<String> {
        for p in self.lower.iter().chain([&self.upper, &self.work]) {
            let s = p.to_string_lossy();
            if s.contains([',', ':', '\\']) || p.to_str().is_none() {
                return Err(Error::invalid(
                    p.display().to_string(),
                    "overlayfs paths may not contain ',', ':' or '\\'; choose another store root",
                ));
            }
        }
        let join = |v: Vec<String>| v.join(":");
        let plain = join(self.lower.iter().map(|p| p.to_string_lossy().into_owned()).collect());
        let tail = format!(",upperdir={},workdir={}", self.upper.display(), self.work.display());
        if plain.len() + tail.len() + 20 <= MAX_OPTIONS {
            return Ok(format!("lowerdir={plain}{tail}"));
        }
        let mut names = Vec::new();
        for p in &self.lower {
            let fd = rustix::fs::open(p, OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty()).at(p)?;
            names.push(format!("/proc/self/fd/{}", fd.as_raw_fd()));
            fds.push(fd);
        }
        let opts = format!("lowerdir={}{tail}", join(names));
        if opts.len() > MAX_OPTIONS {
            return Err(Error::invalid(
                format!("rootfs {}", self.id),
                format!("{} layers do not fit in one overlay mount; squash the image", self.lower.len()),
            ));
        }
        Ok(opts)
    }

    /// Mounts the overlay on `merged`.
    pub fn mount(&self) -> Result<()> {
        self.create_dirs()?;
        let mut fds = Vec::new();
        let opts = self.options(&mut fds)?;
        let data = CString::new(opts).map_err(|e| Error::invalid("overlay options", e.to_string()))?;
        rustix::mount::mount("overlay", &self.merged, "overlay", MountFlags::empty(), Some(data.as_c_str())).map_err(
            |e| Error::Io {
                path: self.merged.clone(),
                source: std::io::Error::other(format!("mounting overlayfs ({} layers): {e}", self.lower.len())),
            },
        )?;
        drop(fds);
        Ok(())
    }

    /// Whether `merged` is a mount point now.
    pub fn is_mounted(&self) -> bool {
        is_mount_point(&self.merged)
    }

    /// Unmounts `merged` (lazily if it is busy).
    pub fn unmount(&self) -> Result<()> {
        if !self.is_mounted() {
            return Ok(());
        }
        match rustix::mount::unmount(&self.merged, UnmountFlags::empty()) {
            Ok(()) => Ok(()),
            Err(rustix::io::Errno::BUSY) => rustix::mount::unmount(&self.merged, UnmountFlags::DETACH).at(&self.merged),
            Err(e) => Err(e).at(&self.merged),
        }
    }
}

/// Whether `p` is a mount point (listed in /proc/self/mountinfo).
pub fn is_mount_point(p: &Path) -> bool {
    let Ok(canon) = p.canonicalize() else { return false };
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else { return false };
    let want = canon.to_string_lossy();
    info.lines().any(|l| l.split(' ').nth(4).map(unescape_mountinfo).as_deref() == Some(&*want))
}

fn unescape_mountinfo(s: &str) -> String {
    s.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")
}

/// Unmounts every mount at or below `dir` (deepest first); used before removing directories.
pub(crate) fn unmount_all_under(dir: &Path) {
    let Ok(canon) = dir.canonicalize() else { return };
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else { return };
    let mut points: Vec<String> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(unescape_mountinfo))
        .filter(|m| Path::new(m).starts_with(&canon))
        .collect();
    points.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for m in points {
        let _ = rustix::mount::unmount(m.as_str(), UnmountFlags::DETACH);
    }
}

fn check_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('.')
        && id.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(
            format!("container id {id:?}"),
            "use 1 to 128 letters, digits, '_', '.', '-' (not starting with '.')",
        ))
    }
}

impl Store {
    /// The unpacked lower directories of an image, topmost first (an empty directory for an
    /// image without layers, since overlayfs needs one).
    pub fn lower_dirs(&self, img: &Image) -> Result<(Vec<PathBuf>, Vec<String>)> {
        let mut lower = Vec::new();
        let mut ids = Vec::new();
        for l in self.layers_of(img)? {
            lower.push(self.ensure_unpacked(&l)?);
            ids.push(l.diff_id.digest().to_string());
        }
        if lower.is_empty() {
            let empty = self.root().join("layers/empty");
            fs::create_dir_all(&empty).at(&empty)?;
            lower.push(empty);
        }
        lower.reverse();
        Ok((lower, ids))
    }

    /// Creates the directories of container `id`'s root filesystem over `image` (unpacking
    /// layers not yet unpacked) and records them so that GC keeps the layers. Call
    /// [`RootfsMount::mount`] to mount it.
    pub fn prepare_rootfs(&self, image: &str, id: &str) -> Result<RootfsMount> {
        check_id(id)?;
        let _w = self.writer_lock()?;
        let img = crate::busybox::resolve_or_make(self, image)?;
        let dir = self.root().join("containers").join(id);
        if dir.exists() {
            return Err(Error::invalid(
                format!("container {id}"),
                format!("{} already exists; remove it first", dir.display()),
            ));
        }
        let (lower, diff_ids) = self.lower_dirs(&img)?;
        let mut m = RootfsMount::new(id, lower, &dir);
        m.image = img.digest.to_string();
        m.diff_ids = diff_ids;
        m.create_dirs()?;
        let json = serde_json::to_vec_pretty(&m).map_err(|e| Error::invalid("rootfs.json", e.to_string()))?;
        self.write_atomic(&dir.join("rootfs.json"), &json)?;
        Ok(m)
    }

    /// The recorded root filesystem of container `id`.
    pub fn rootfs(&self, id: &str) -> Result<RootfsMount> {
        check_id(id)?;
        let p = self.root().join("containers").join(id).join("rootfs.json");
        let bytes = crate::store::read_limited(&p, crate::store::MAX_JSON)?;
        serde_json::from_slice(&bytes).map_err(|e| Error::invalid(p.display().to_string(), e.to_string()))
    }

    /// Unmounts and deletes container `id`'s root filesystem (its upper layer is lost).
    pub fn remove_rootfs(&self, id: &str) -> Result<()> {
        check_id(id)?;
        let dir = self.root().join("containers").join(id);
        unmount_all_under(&dir);
        fs::remove_dir_all(&dir).at(&dir)
    }
}

/// diff_ids used by prepared containers.
pub(crate) fn container_layers(store: &Store) -> Result<Vec<Vec<String>>> {
    let dir = store.root().join("containers");
    let mut out = Vec::new();
    for e in fs::read_dir(&dir).at(&dir)?.flatten() {
        if let Ok(m) = store.rootfs(&e.file_name().to_string_lossy()) {
            out.push(m.diff_ids);
        }
    }
    Ok(out)
}
