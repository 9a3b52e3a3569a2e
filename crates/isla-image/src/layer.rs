//! Layer tarballs: safe unpacking into overlayfs form, and writing a layer from a directory.
//!
//! Unpacking never follows a symbolic link and never leaves the layer directory: every entry's
//! parent is opened component by component from the layer root with `O_NOFOLLOW`, and the entry
//! is created relative to that directory descriptor (`mkdirat`, `openat`, `symlinkat`, `linkat`,
//! `mknodat`). Paths with `..`, entries that would pass through a symlink, and hard links to
//! anything outside the layer are refused with an error naming the entry. Symbolic links
//! themselves may point anywhere (absolute links are normal in images: they are resolved inside
//! the container, never by the unpacker). `trusted.overlay.*` extended attributes in a tarball
//! are refused, since they would steer overlayfs.
//!
//! OCI whiteouts become overlayfs whiteouts: `.wh.NAME` becomes a character device 0/0 named
//! NAME, and `.wh..wh..opq` sets `trusted.overlay.opaque=y` on its directory. Writing a layer
//! from an overlay upper directory does the reverse.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use rustix::fs::{AtFlags, FileType, Mode, OFlags, Timestamps, XattrFlags};
use tar::{EntryType, Header};

use crate::digest::HashingReader;
use crate::error::{Error, IoContext, Result};
use oci_spec::image::Digest;

const WH_PREFIX: &str = ".wh.";
const WH_OPAQUE: &str = ".wh..wh..opq";
const OPAQUE_XATTR: &str = "trusted.overlay.opaque";

/// Wraps `r` in the right decompressor after looking at its first bytes (gzip, or plain tar).
pub fn decompress<'a>(r: impl Read + 'a, what: &str) -> Result<Box<dyn Read + 'a>> {
    let mut br = BufReader::with_capacity(1 << 20, r);
    let head = br.fill_buf().map_err(|e| Error::invalid(what, format!("reading failed: {e}")))?;
    if head.starts_with(&[0x1f, 0x8b]) {
        Ok(Box::new(flate2::bufread::MultiGzDecoder::new(br)))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Err(Error::invalid(what, "zstd-compressed layers are not supported yet (gzip and plain tar are)"))
    } else {
        Ok(Box::new(br))
    }
}

/// Splits a tar path into checked components ("./a//b/" -> ["a", "b"]). A leading "/" is
/// dropped, as tar does; ".." is refused.
fn components<'p>(raw: &'p [u8], layer: &str) -> Result<Vec<&'p [u8]>> {
    let mut out = Vec::new();
    for c in raw.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                return Err(Error::UnsafeEntry {
                    layer: layer.into(),
                    entry: String::from_utf8_lossy(raw).into(),
                    msg: "path contains `..` and would escape the layer; refusing the archive".into(),
                })
            }
            c => out.push(c),
        }
    }
    Ok(out)
}

/// Unpacks a (possibly gzip-compressed) layer tarball into the empty directory `dest`.
/// Returns the diff_id (digest of the uncompressed tar) and the number of entries.
pub fn unpack(r: impl Read, dest: &Path, layer: &str) -> Result<(Digest, u64)> {
    let hr = HashingReader::new(decompress(r, layer)?);
    let mut ar = tar::Archive::new(hr);
    let root: OwnedFd =
        rustix::fs::open(dest, OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty()).at(dest)?;
    let mut u = Unpacker { root, layer, dest, cache: None };
    let mut n = 0u64;
    let entries = ar.entries().map_err(|e| Error::invalid(layer, format!("not a tar archive: {e}")))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| Error::invalid(layer, format!("corrupt tar archive: {e}")))?;
        u.entry(&mut entry)?;
        n += 1;
    }
    let (d, _) = ar.into_inner().drain().map_err(|e| Error::invalid(layer, format!("corrupt tar archive: {e}")))?;
    Ok((d, n))
}

struct Unpacker<'a> {
    root: OwnedFd,
    layer: &'a str,
    dest: &'a Path,
    /// The last parent directory opened, by its components.
    cache: Option<(Vec<Vec<u8>>, OwnedFd)>,
}

impl Unpacker<'_> {
    fn refuse(&self, entry: &[u8], msg: impl Into<String>) -> Error {
        Error::UnsafeEntry { layer: self.layer.into(), entry: String::from_utf8_lossy(entry).into(), msg: msg.into() }
    }

    fn io(&self, entry: &[u8], e: impl Into<io::Error>) -> Error {
        Error::Io { path: self.dest.join(OsStr::from_bytes(entry)), source: e.into() }
    }

    /// Opens (creating missing directories) the directory `comps` below the root without
    /// following any symbolic link.
    fn open_dir(&mut self, comps: &[&[u8]], entry: &[u8]) -> Result<OwnedFd> {
        if let Some((c, fd)) = &self.cache {
            if c.len() == comps.len() && c.iter().zip(comps).all(|(a, b)| a == b) {
                return fd.try_clone().map_err(|e| self.io(entry, e));
            }
        }
        let mut fd = self.root.try_clone().map_err(|e| self.io(entry, e))?;
        for c in comps {
            let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
            let next = match rustix::fs::openat(&fd, *c, flags, Mode::empty()) {
                Ok(f) => f,
                Err(rustix::io::Errno::NOENT) => {
                    rustix::fs::mkdirat(&fd, *c, Mode::from_bits_truncate(0o755)).map_err(|e| self.io(entry, e))?;
                    rustix::fs::openat(&fd, *c, flags, Mode::empty()).map_err(|e| self.io(entry, e))?
                }
                Err(rustix::io::Errno::NOTDIR) | Err(rustix::io::Errno::LOOP) => {
                    return Err(self.refuse(
                        entry,
                        format!(
                            "goes through {:?}, which is a symbolic link or not a directory; refusing to follow it",
                            String::from_utf8_lossy(c)
                        ),
                    ))
                }
                Err(e) => return Err(self.io(entry, e)),
            };
            fd = next;
        }
        let copy = fd.try_clone().map_err(|e| self.io(entry, e))?;
        self.cache = Some((comps.iter().map(|c| c.to_vec()).collect(), copy));
        Ok(fd)
    }

    /// Removes whatever is at `name` in `dir` unless both it and the new entry are directories.
    fn clear(&self, dir: &OwnedFd, name: &[u8], new_is_dir: bool, entry: &[u8]) -> Result<bool> {
        match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => {
                let is_dir = FileType::from_raw_mode(st.st_mode) == FileType::Directory;
                if is_dir && new_is_dir {
                    return Ok(true);
                }
                let flags = if is_dir { AtFlags::REMOVEDIR } else { AtFlags::empty() };
                rustix::fs::unlinkat(dir, name, flags).map_err(|e| self.io(entry, e))?;
                Ok(false)
            }
            Err(rustix::io::Errno::NOENT) => Ok(false),
            Err(e) => Err(self.io(entry, e)),
        }
    }

    fn entry<R: Read>(&mut self, e: &mut tar::Entry<R>) -> Result<()> {
        let raw = e.path_bytes().into_owned();
        let comps = components(&raw, self.layer)?;
        let Some((name, parent)) = comps.split_last() else {
            return Ok(()); // the layer root itself ("./")
        };
        let (name, parent) = (name.to_vec(), parent.to_vec());
        let dir = self.open_dir(&parent, &raw)?;
        let h = e.header().clone();
        let kind = h.entry_type();

        // Whiteouts.
        if name.as_slice() == WH_OPAQUE.as_bytes() {
            let path = fd_path(&dir, b".");
            rustix::fs::lsetxattr(&path, OPAQUE_XATTR, b"y", XattrFlags::empty()).map_err(|e| self.io(&raw, e))?;
            return Ok(());
        }
        if let Some(hidden) = name.strip_prefix(WH_PREFIX.as_bytes()) {
            if hidden.is_empty() || hidden == b"." || hidden == b".." {
                return Err(self.refuse(&raw, "whiteout without a valid name"));
            }
            self.clear(&dir, hidden, false, &raw)?;
            rustix::fs::mknodat(&dir, hidden, FileType::CharacterDevice, Mode::empty(), 0)
                .map_err(|e| self.io(&raw, e))?;
            self.invalidate(&parent, hidden);
            return Ok(());
        }

        let mode = Mode::from_bits_truncate(h.mode().map_err(|e| self.io(&raw, e))? & 0o7777);
        let existing_dir = self.clear(&dir, &name, kind == EntryType::Directory, &raw)?;
        if kind != EntryType::Directory {
            self.invalidate(&parent, &name);
        }
        match kind {
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                let flags = OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
                let fd = rustix::fs::openat(&dir, name.as_slice(), flags, Mode::from_bits_truncate(0o600))
                    .map_err(|er| self.io(&raw, er))?;
                let mut f = File::from(fd);
                io::copy(e, &mut f).map_err(|er| {
                    Error::invalid(self.layer, format!("entry {:?}: {er}", String::from_utf8_lossy(&raw)))
                })?;
            }
            EntryType::Directory => {
                if !existing_dir {
                    rustix::fs::mkdirat(&dir, name.as_slice(), Mode::from_bits_truncate(0o700))
                        .map_err(|er| self.io(&raw, er))?;
                }
            }
            EntryType::Symlink => {
                let target = e.link_name_bytes().ok_or_else(|| self.refuse(&raw, "symbolic link without a target"))?;
                rustix::fs::symlinkat(OsStr::from_bytes(&target), &dir, name.as_slice())
                    .map_err(|er| self.io(&raw, er))?;
            }
            EntryType::Link => {
                let target =
                    e.link_name_bytes().ok_or_else(|| self.refuse(&raw, "hard link without a target"))?.into_owned();
                let tcomps = components(&target, self.layer)?;
                let Some((tname, tparent)) = tcomps.split_last() else {
                    return Err(self.refuse(&raw, "hard link to the layer root"));
                };
                let tdir = self.open_dir(tparent, &raw)?;
                rustix::fs::linkat(&tdir, *tname, &dir, name.as_slice(), AtFlags::empty()).map_err(|er| match er {
                    rustix::io::Errno::NOENT => self.refuse(
                        &raw,
                        format!(
                            "hard link to {:?}, which is not earlier in this layer",
                            String::from_utf8_lossy(&target)
                        ),
                    ),
                    er => self.io(&raw, er),
                })?;
                // A hard link shares the target's metadata; nothing more to set.
                return Ok(());
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                let ft = match kind {
                    EntryType::Char => FileType::CharacterDevice,
                    EntryType::Block => FileType::BlockDevice,
                    _ => FileType::Fifo,
                };
                let maj = h.device_major().ok().flatten().unwrap_or(0);
                let min = h.device_minor().ok().flatten().unwrap_or(0);
                rustix::fs::mknodat(&dir, name.as_slice(), ft, mode, rustix::fs::makedev(maj, min))
                    .map_err(|er| self.io(&raw, er))?;
            }
            EntryType::XGlobalHeader | EntryType::XHeader | EntryType::GNULongName | EntryType::GNULongLink => {
                return Ok(())
            }
            other => return Err(self.refuse(&raw, format!("unsupported tar entry type {other:?}"))),
        }

        // Metadata: owner first (chown clears set-id bits), then mode, extended attributes, times.
        let uid = h.uid().ok().and_then(|u| u32::try_from(u).ok()).unwrap_or(0);
        let gid = h.gid().ok().and_then(|g| u32::try_from(g).ok()).unwrap_or(0);
        rustix::fs::chownat(
            &dir,
            name.as_slice(),
            Some(rustix::fs::Uid::from_raw(uid)),
            Some(rustix::fs::Gid::from_raw(gid)),
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(|er| self.io(&raw, er))?;
        if kind != EntryType::Symlink {
            // The name was just created as a non-link by us, so following is not possible here.
            rustix::fs::chmodat(&dir, name.as_slice(), mode, AtFlags::empty()).map_err(|er| self.io(&raw, er))?;
        }
        if let Ok(Some(exts)) = e.pax_extensions() {
            let path = fd_path(&dir, &name);
            for ext in exts.flatten() {
                let Some(key) = ext.key_bytes().strip_prefix(b"SCHILY.xattr.") else { continue };
                if key.starts_with(b"trusted.overlay.") {
                    return Err(self
                        .refuse(&raw, "carries a trusted.overlay.* extended attribute, which would steer overlayfs"));
                }
                rustix::fs::lsetxattr(&path, OsStr::from_bytes(key), ext.value_bytes(), XattrFlags::empty())
                    .map_err(|er| self.io(&raw, er))?;
            }
        }
        if kind != EntryType::Directory {
            let mtime = h.mtime().unwrap_or(0) as i64;
            let ts = rustix::fs::Timespec { tv_sec: mtime, tv_nsec: 0 };
            let times = Timestamps { last_access: ts, last_modification: ts };
            rustix::fs::utimensat(&dir, name.as_slice(), &times, AtFlags::SYMLINK_NOFOLLOW)
                .map_err(|er| self.io(&raw, er))?;
        }
        Ok(())
    }

    /// Drops the cached directory if `parent/name` (just replaced) is on its path.
    fn invalidate(&mut self, parent: &[&[u8]], name: &[u8]) {
        if let Some((c, _)) = &self.cache {
            if c.len() > parent.len()
                && c[..parent.len()].iter().zip(parent).all(|(a, b)| a == b)
                && c[parent.len()] == name
            {
                self.cache = None;
            }
        }
    }
}

/// `/proc/self/fd/N/name`: a path to `name` inside an open directory, for the path-based
/// xattr calls (the directory part is resolved through the descriptor, the last component is
/// not followed by the `l*xattr` calls).
fn fd_path(dir: &impl AsFd, name: &[u8]) -> std::path::PathBuf {
    use std::os::fd::AsRawFd;
    let mut p = format!("/proc/self/fd/{}/", dir.as_fd().as_raw_fd()).into_bytes();
    p.extend_from_slice(name);
    std::path::PathBuf::from(OsStr::from_bytes(&p))
}

/// How to write a layer from a directory.
#[derive(Debug, Clone, Copy, Default)]
pub struct WriteOptions {
    /// The directory is an overlayfs upper directory: turn its whiteouts and opaque
    /// directories into OCI form.
    pub overlay: bool,
    /// Give every entry this modification time (for reproducible layers).
    pub mtime: Option<u64>,
}

/// Writes the content of `dir` as an uncompressed layer tarball to `out`, entries sorted by
/// name so that the same tree always gives the same bytes.
pub fn write_dir(dir: &Path, out: &mut dyn Write, opts: WriteOptions) -> Result<()> {
    let mut b = tar::Builder::new(out);
    b.follow_symlinks(false);
    let mut links = HashMap::new();
    walk(&mut b, dir, "", opts, &mut links)?;
    b.into_inner().and_then(|w| w.flush()).at(dir)?;
    Ok(())
}

fn walk(
    b: &mut tar::Builder<&mut dyn Write>,
    dir: &Path,
    rel: &str,
    opts: WriteOptions,
    links: &mut HashMap<(u64, u64), String>,
) -> Result<()> {
    let mut names: Vec<_> =
        std::fs::read_dir(dir).at(dir)?.map(|e| e.map(|e| e.file_name())).collect::<io::Result<_>>().at(dir)?;
    names.sort();
    for name in names {
        let path = dir.join(&name);
        let name = name.to_str().ok_or_else(|| Error::invalid(path.display().to_string(), "file name is not UTF-8"))?;
        let tpath = format!("{rel}{name}");
        let md = std::fs::symlink_metadata(&path).at(&path)?;
        let ft = md.file_type();
        if opts.overlay && ft.is_char_device() && md.rdev() == 0 {
            let mut h = header(&md, opts, EntryType::Regular);
            h.set_size(0);
            h.set_mode(0o644);
            b.append_data(&mut h, format!("{rel}{WH_PREFIX}{name}"), io::empty()).at(&path)?;
            continue;
        }
        let xattrs = xattrs(&path)?;
        if !xattrs.is_empty() {
            b.append_pax_extensions(xattrs.iter().map(|(k, v)| (k.as_str(), v.as_slice()))).at(&path)?;
        }
        if ft.is_dir() {
            let mut h = header(&md, opts, EntryType::Directory);
            b.append_data(&mut h, format!("{tpath}/"), io::empty()).at(&path)?;
            if opts.overlay && is_opaque(&path) {
                let mut h = header(&md, opts, EntryType::Regular);
                h.set_mode(0o644);
                b.append_data(&mut h, format!("{tpath}/{WH_OPAQUE}"), io::empty()).at(&path)?;
            }
            walk(b, &path, &format!("{tpath}/"), opts, links)?;
        } else if ft.is_symlink() {
            let target = std::fs::read_link(&path).at(&path)?;
            let mut h = header(&md, opts, EntryType::Symlink);
            b.append_link(&mut h, &tpath, &target).at(&path)?;
        } else if ft.is_file() {
            if md.nlink() > 1 {
                if let Some(first) = links.get(&(md.dev(), md.ino())) {
                    let mut h = header(&md, opts, EntryType::Link);
                    b.append_link(&mut h, &tpath, first).at(&path)?;
                    continue;
                }
                links.insert((md.dev(), md.ino()), tpath.clone());
            }
            let mut h = header(&md, opts, EntryType::Regular);
            h.set_size(md.len());
            let f = File::open(&path).at(&path)?;
            b.append_data(&mut h, &tpath, f.take(md.len())).at(&path)?;
        } else {
            let kind = if ft.is_char_device() {
                EntryType::Char
            } else if ft.is_block_device() {
                EntryType::Block
            } else if ft.is_fifo() {
                EntryType::Fifo
            } else {
                continue; // sockets are not archived
            };
            let mut h = header(&md, opts, kind);
            let dev = md.rdev();
            h.set_device_major(rustix::fs::major(dev)).at(&path)?;
            h.set_device_minor(rustix::fs::minor(dev)).at(&path)?;
            b.append_data(&mut h, &tpath, io::empty()).at(&path)?;
        }
    }
    Ok(())
}

fn header(md: &std::fs::Metadata, opts: WriteOptions, kind: EntryType) -> Header {
    let mut h = Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(md.mode() & 0o7777);
    h.set_uid(md.uid().into());
    h.set_gid(md.gid().into());
    h.set_mtime(opts.mtime.unwrap_or(md.mtime().max(0) as u64));
    h.set_size(0);
    h
}

fn is_opaque(path: &Path) -> bool {
    let mut buf = [0u8; 4];
    matches!(rustix::fs::lgetxattr(path, OPAQUE_XATTR, &mut buf[..]), Ok(1) if buf[0] == b'y')
}

/// Extended attributes worth archiving: everything but overlayfs' own and SELinux labels.
fn xattrs(path: &Path) -> Result<Vec<(String, Vec<u8>)>> {
    let mut names = vec![0u8; 4096];
    let n = match rustix::fs::llistxattr(path, &mut names[..]) {
        Ok(n) => n,
        Err(rustix::io::Errno::NOTSUP) => return Ok(vec![]),
        Err(e) => return Err(Error::Io { path: path.into(), source: e.into() }),
    };
    let mut out = Vec::new();
    for name in names[..n].split(|b| *b == 0).filter(|s| !s.is_empty()) {
        let Ok(name) = std::str::from_utf8(name) else { continue };
        if name.starts_with("trusted.overlay.") || name == "security.selinux" {
            continue;
        }
        let mut val = vec![0u8; 65536];
        match rustix::fs::lgetxattr(path, name, &mut val[..]) {
            Ok(len) => {
                val.truncate(len);
                out.push((format!("SCHILY.xattr.{name}"), val));
            }
            Err(rustix::io::Errno::NODATA) => {}
            Err(e) => return Err(Error::Io { path: path.into(), source: e.into() }),
        }
    }
    Ok(out)
}
