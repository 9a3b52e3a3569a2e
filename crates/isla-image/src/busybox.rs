//! Starter images made without a network: any root filesystem directory
//! ([`from_rootfs`]), and a busybox image from the host's static busybox ([`busybox_image`]).
//!
//! The busybox image is reproducible: entries sorted, every time stamp 0, owner root, the
//! configuration's `created` fixed, so the same busybox binary always gives the same digest.

use std::io::{self, Write};
use std::path::Path;
use std::process::Command;

use oci_spec::image::{Digest, ImageConfiguration};
use tar::{EntryType, Header};

use crate::error::{Error, IoContext, Result};
use crate::layer::{self, WriteOptions};
use crate::store::{Image, Store};

/// Where Debian's busybox-static puts the binary.
pub const HOST_BUSYBOX: &str = "/bin/busybox";
/// The name the busybox image gets by default.
pub const BUSYBOX_NAME: &str = "busybox:latest";

/// Whether `name` means the built-in busybox image ("busybox" or "busybox:latest").
pub fn is_busybox_name(name: &str) -> bool {
    name == "busybox" || name == BUSYBOX_NAME
}

fn config(cmd: &[&str]) -> Result<ImageConfiguration> {
    serde_json::from_value(serde_json::json!({
        "created": "1970-01-01T00:00:00Z",
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": cmd,
        },
        "rootfs": {"type": "layers", "diff_ids": []},
    }))
    .map_err(|e| Error::invalid("image configuration", e.to_string()))
}

fn entry(
    b: &mut tar::Builder<&mut dyn Write>,
    path: &str,
    kind: EntryType,
    mode: u32,
    data: &[u8],
    link: Option<&str>,
) -> io::Result<()> {
    let mut h = Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_size(data.len() as u64);
    match link {
        Some(l) => b.append_link(&mut h, path, l),
        None => b.append_data(&mut h, path, data),
    }
}

/// The busybox layer as an uncompressed tar: directories, /bin/busybox, one symbolic link per
/// applet (`busybox --list-full`), /etc/passwd and /etc/group.
pub fn busybox_layer(busybox: &Path, out: &mut dyn Write) -> Result<()> {
    let bin = std::fs::read(busybox).map_err(|e| Error::Io {
        path: busybox.into(),
        source: io::Error::new(e.kind(), format!("{e} (install Debian's busybox-static package)")),
    })?;
    let list = Command::new(busybox).arg("--list-full").output().at(busybox)?;
    if !list.status.success() {
        return Err(Error::invalid(
            busybox.display().to_string(),
            "`busybox --list-full` failed; is it a static busybox?",
        ));
    }
    let mut applets: Vec<String> = String::from_utf8_lossy(&list.stdout)
        .lines()
        .map(|l| l.trim().trim_start_matches('/').to_string())
        .filter(|l| !l.is_empty() && l != "bin/busybox" && !l.contains(".."))
        .collect();
    applets.sort();
    applets.dedup();
    let mut dirs: Vec<&str> =
        vec!["bin", "dev", "etc", "home", "proc", "root", "sbin", "sys", "tmp", "usr", "usr/bin", "usr/sbin", "var"];
    dirs.sort();
    let mut b = tar::Builder::new(out);
    let w = |e: io::Error| Error::invalid("busybox layer", e.to_string());
    for d in dirs {
        let mode = match d {
            "tmp" => 0o1777,
            "root" => 0o700,
            _ => 0o755,
        };
        entry(&mut b, &format!("{d}/"), EntryType::Directory, mode, &[], None).map_err(w)?;
    }
    entry(&mut b, "bin/busybox", EntryType::Regular, 0o755, &bin, None).map_err(w)?;
    for a in &applets {
        entry(&mut b, a, EntryType::Symlink, 0o777, &[], Some("/bin/busybox")).map_err(w)?;
    }
    let passwd = b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n";
    let group = b"root:x:0:\nnogroup:x:65534:\n";
    entry(&mut b, "etc/group", EntryType::Regular, 0o644, group, None).map_err(w)?;
    entry(&mut b, "etc/passwd", EntryType::Regular, 0o644, passwd, None).map_err(w)?;
    b.into_inner().and_then(|o| o.flush()).map_err(w)?;
    Ok(())
}

/// Builds the busybox image from [`HOST_BUSYBOX`] and names it `name` (default
/// [`BUSYBOX_NAME`]). Returns the manifest digest.
pub fn busybox_image(store: &Store, name: Option<&str>) -> Result<Digest> {
    let _w = store.writer_lock()?;
    let l = store.add_layer(|w| busybox_layer(Path::new(HOST_BUSYBOX), w))?;
    let mut cfg = config(&["/bin/sh"])?;
    cfg.rootfs_mut().diff_ids_mut().push(l.diff_id.to_string());
    store.commit_image(&cfg, &[l], Some(name.unwrap_or(BUSYBOX_NAME)))
}

/// Resolves `name`; "busybox" is made from the host's busybox-static when the store lacks it
/// (so `isla run busybox ...` works on a fresh machine without a network).
pub fn resolve_or_make(store: &Store, name: &str) -> Result<Image> {
    match store.resolve(name) {
        Err(Error::NotFound(_)) if is_busybox_name(name) => {
            let d = busybox_image(store, None)?;
            store.load_image(&d, vec![BUSYBOX_NAME.to_string()])
        }
        r => r,
    }
}

/// Makes a single-layer image of directory `dir`. With `reproducible`, every time stamp is 0.
pub fn from_rootfs(store: &Store, dir: &Path, name: &str, reproducible: bool) -> Result<Digest> {
    if !dir.is_dir() {
        return Err(Error::invalid(dir.display().to_string(), "is not a directory"));
    }
    let _w = store.writer_lock()?;
    let opts = WriteOptions { overlay: false, mtime: reproducible.then_some(0) };
    let l = store.add_layer(|w| layer::write_dir(dir, w, opts))?;
    let mut cfg = config(&["/bin/sh"])?;
    cfg.rootfs_mut().diff_ids_mut().push(l.diff_id.to_string());
    store.commit_image(&cfg, &[l], Some(name))
}
