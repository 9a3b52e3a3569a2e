//! Named volumes, Docker's way: `-v NAME:/path[:ro]` mounts `<root>/volumes/NAME/_data`, made
//! on first use (or by `isla volume create`). A volume outlives the instances that use it; it
//! goes only with [`Manager::volume_remove`] (`isla volume rm`), which refuses while any
//! instance (running or not) mounts it, or with [`Manager::volume_prune`].
//!
//! The volumes are rows of the store's `volumes` table; an instance records the volume by
//! name and by its resolved directory in its spec, so "in use" is a scan of the instances.
//!
//! As in Docker, an empty volume mounted by a new container is first filled with what the
//! container's image has at the mount path ([`populate`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::{io, Error, Result};
use crate::manager::Manager;
use crate::model::{check_volume_name, Volume};
use crate::proc::now_rfc3339;
use crate::store::VolumeRow;

/// A named volume as `isla volume ls|inspect` show it.
#[derive(Debug, Clone, Serialize)]
pub struct VolumeInfo {
    /// The name.
    pub name: String,
    /// Always `local`: a directory below the root.
    pub driver: &'static str,
    /// The directory instances mount (`<root>/volumes/NAME/_data`).
    pub mountpoint: PathBuf,
    /// RFC 3339 creation time.
    pub created: String,
    /// Labels (`isla.compose.project` for compose volumes).
    pub labels: BTreeMap<String, String>,
    /// Instances that mount it.
    pub in_use_by: Vec<String>,
}

impl Manager {
    fn volume_info(&self, row: VolumeRow) -> Result<VolumeInfo> {
        Ok(VolumeInfo {
            mountpoint: self.env().volume_data(&row.name),
            in_use_by: self.store().volume_users(&row.name)?,
            name: row.name,
            driver: "local",
            created: row.created,
            labels: row.labels,
        })
    }

    /// Creates the volume `name` (with its directory) unless it exists; the volume, and whether
    /// it was new. An existing volume keeps its labels, as in Docker.
    pub fn volume_create(&self, name: &str, labels: &BTreeMap<String, String>) -> Result<(VolumeInfo, bool)> {
        check_volume_name(name)?;
        let (row, new) = self.store().volume_create(name, labels, &now_rfc3339())?;
        let data = self.env().volume_data(name);
        std::fs::create_dir_all(&data).map_err(io(format!("creating {}", data.display())))?;
        Ok((self.volume_info(row)?, new))
    }

    /// Every volume, by name.
    pub fn volume_list(&self) -> Result<Vec<VolumeInfo>> {
        self.store().volume_list()?.into_iter().map(|r| self.volume_info(r)).collect()
    }

    /// One volume.
    pub fn volume_get(&self, name: &str) -> Result<VolumeInfo> {
        let row = self.store().volume_get(name)?.ok_or_else(|| crate::Error::NoSuchVolume(name.to_string()))?;
        self.volume_info(row)
    }

    /// Removes a volume and its files; refused while an instance mounts it.
    pub fn volume_remove(&self, name: &str) -> Result<()> {
        let dir = self.env().volume_dir(name);
        self.store().volume_remove(name, || match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(format!("removing {}", dir.display()))(e)),
            _ => Ok(()),
        })
    }

    /// Removes every volume no instance mounts; their names.
    pub fn volume_prune(&self) -> Result<Vec<String>> {
        let mut removed = Vec::new();
        for v in self.store().volume_list()? {
            match self.volume_remove(&v.name) {
                Ok(()) => removed.push(v.name),
                // Mounted (perhaps since the list was read), or removed by someone else.
                Err(crate::Error::VolumeInUse { .. } | crate::Error::NoSuchVolume(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(removed)
    }
}

/// Whether a directory has no entries (a missing one counts as empty).
fn is_empty_dir(dir: &Path) -> Result<bool> {
    match std::fs::read_dir(dir) {
        Ok(mut rd) => Ok(rd.next().is_none()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
        Err(e) => Err(io(format!("reading {}", dir.display()))(e)),
    }
}

/// The named volumes of `volumes` that are empty: [`populate`] fills them.
pub fn empty_named(volumes: &[Volume]) -> Result<Vec<&Volume>> {
    let mut out = Vec::new();
    for v in volumes.iter().filter(|v| v.name.is_some()) {
        if is_empty_dir(&v.host)? {
            out.push(v);
        }
    }
    Ok(out)
}

/// Copies what the container's root file system `rootfs` (mounted) has at the volume's mount
/// path into the (empty) volume, keeping modes, owners, times and links (`cp -a`). Nothing is
/// copied when the path is missing, is not a directory, or passes through a symbolic link (a
/// link in the image must not lead the copy out to the host's files).
pub fn populate(rootfs: &Path, v: &Volume) -> Result<()> {
    let mut src = rootfs.to_path_buf();
    for part in v.guest.split('/').filter(|p| !p.is_empty() && *p != ".") {
        src.push(part);
        match std::fs::symlink_metadata(&src) {
            Ok(md) if md.is_dir() => {}
            _ => return Ok(()),
        }
    }
    if src == rootfs || is_empty_dir(&src)? {
        return Ok(());
    }
    let out = std::process::Command::new("cp")
        .arg("-a")
        .arg("--no-target-directory")
        .arg(src.join("."))
        .arg(&v.host)
        .output()
        .map_err(io("running cp -a"))?;
    if !out.status.success() {
        return Err(Error::Io {
            what: format!("copying the image's {} into volume {}", v.guest, v.name.as_deref().unwrap_or_default()),
            source: std::io::Error::other(String::from_utf8_lossy(&out.stderr).trim().to_string()),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn populate_copies_image_files_but_never_follows_links() {
        let d = tempfile::tempdir().unwrap();
        let rootfs = d.path().join("rootfs");
        std::fs::create_dir_all(rootfs.join("srv/www/sub")).unwrap();
        std::fs::write(rootfs.join("srv/www/sub/index.html"), "hi").unwrap();
        std::os::unix::fs::symlink("index.html", rootfs.join("srv/www/sub/link")).unwrap();
        // A link in the image pointing at the host's files.
        std::os::unix::fs::symlink("/etc", rootfs.join("hostetc")).unwrap();
        std::os::unix::fs::symlink("/", rootfs.join("up")).unwrap();
        let vol = |guest: &str, name: &str| {
            let mut v = Volume::named(name, guest, false);
            v.host = d.path().join(name);
            std::fs::create_dir_all(&v.host).unwrap();
            v
        };
        let www = vol("/srv/www", "www");
        assert_eq!(empty_named(std::slice::from_ref(&www)).unwrap().len(), 1);
        populate(&rootfs, &www).unwrap();
        assert_eq!(std::fs::read_to_string(www.host.join("sub/index.html")).unwrap(), "hi");
        assert_eq!(std::fs::read_link(www.host.join("sub/link")).unwrap(), Path::new("index.html"));
        assert!(empty_named(std::slice::from_ref(&www)).unwrap().is_empty());
        for (guest, name) in [("/hostetc", "a"), ("/up/etc", "b"), ("/missing", "c"), ("/srv/www/sub/index.html", "d")]
        {
            let v = vol(guest, name);
            populate(&rootfs, &v).unwrap();
            assert!(is_empty_dir(&v.host).unwrap(), "{guest} was copied");
        }
    }
}
