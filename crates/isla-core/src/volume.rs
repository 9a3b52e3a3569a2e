//! Named volumes, Docker's way: `-v NAME:/path[:ro]` mounts `<root>/volumes/NAME/_data`, made
//! on first use (or by `isla volume create`). A volume outlives the instances that use it; it
//! goes only with [`Manager::volume_remove`] (`isla volume rm`), which refuses while any
//! instance (running or not) mounts it, or with [`Manager::volume_prune`].
//!
//! The volumes are rows of the store's `volumes` table; an instance records the volume by
//! name and by its resolved directory in its spec, so "in use" is a scan of the instances.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Serialize;

use crate::error::{io, Result};
use crate::manager::Manager;
use crate::model::check_volume_name;
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
