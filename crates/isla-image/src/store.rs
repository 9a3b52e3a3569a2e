//! The content-addressed store on disk.
//!
//! ```text
//! <root>/oci-layout, index.json, blobs/sha256/<hex>   an OCI image layout; index.json is also the
//!                                                      tag list (annotation ref.name = "name:tag")
//! <root>/layers/<diff_id hex>/                         each layer unpacked once, in overlayfs form
//! <root>/containers/<id>/{upper,work,merged}           per-container overlay directories
//! <root>/cache/build/<key>.json                        build step cache: inputs -> layer
//! <root>/tmp/                                          staging; nothing here is referenced
//! ```
//!
//! Crash consistency: a blob is written to `tmp/`, synced, checked against its digest and renamed
//! into `blobs/`; a layer is unpacked into `layers/.tmp-*` and renamed; `index.json` is replaced
//! by rename last. A process killed at any point therefore leaves only unreferenced staging
//! files, which [`Store::fsck`] reports and [`Store::gc`] removes.
//!
//! Concurrency: writers hold `gc.lock` shared for their whole run and `index.lock` exclusively
//! around each read-modify-write of `index.json`; garbage collection holds `gc.lock` exclusively.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use flate2::write::GzEncoder;
use oci_spec::image::{Descriptor, Digest, ImageConfiguration, ImageIndex, ImageManifest, MediaType, OciLayout};
use serde::{Deserialize, Serialize};

use crate::digest::{self, HashingWriter};
use crate::error::{Error, IoContext, Result};
use crate::layer;
use crate::progress::{Progress, ProgressReader, Quiet};

/// Annotation carrying an image's name in `index.json`.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";
/// JSON documents (manifests, configs, indexes) larger than this are refused.
pub const MAX_JSON: u64 = 8 << 20;
/// The default store location.
pub const DEFAULT_ROOT: &str = "/var/lib/isla/images";

/// An open image store.
#[derive(Clone)]
pub struct Store {
    root: PathBuf,
    progress: Arc<dyn Progress>,
}

/// One image: its manifest, its configuration and the names pointing at it.
#[derive(Debug, Clone)]
pub struct Image {
    /// Names ("name:tag") in the index that point to this manifest.
    pub names: Vec<String>,
    /// Digest of the manifest.
    pub digest: Digest,
    pub manifest: ImageManifest,
    pub config: ImageConfiguration,
    /// Sum of the manifest's config and layer sizes (compressed, as stored).
    pub size: u64,
}

/// A layer as stored: the blob (maybe compressed) and the digest of its uncompressed tar.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LayerDesc {
    pub digest: Digest,
    pub size: u64,
    pub diff_id: Digest,
    pub media_type: String,
}

impl LayerDesc {
    pub fn descriptor(&self) -> Descriptor {
        Descriptor::new(MediaType::from(self.media_type.as_str()), self.size, self.digest.clone())
    }
}

/// What garbage collection removed.
#[derive(Debug, Default, Serialize)]
pub struct GcReport {
    pub blobs_removed: usize,
    pub layers_removed: usize,
    pub staging_removed: usize,
    /// microVM base disks of images that are gone ([`crate::vmdisk`]).
    pub vm_disks_removed: usize,
    pub bytes_freed: u64,
}

/// What [`Store::fsck`] found.
#[derive(Debug, Default, Serialize)]
pub struct FsckReport {
    pub images: usize,
    pub blobs_checked: usize,
    /// Broken references or corrupt content: the store is inconsistent.
    pub errors: Vec<String>,
    /// Harmless leftovers (staging files from interrupted work, unreferenced blobs).
    pub leftovers: Vec<String>,
}

impl FsckReport {
    pub fn is_consistent(&self) -> bool {
        self.errors.is_empty()
    }
}

/// Disk usage by part of the store, in bytes (allocated blocks, hard links counted once).
#[derive(Debug, Default, Serialize)]
pub struct DiskUsage {
    pub blobs: u64,
    pub layers: u64,
    pub containers: u64,
    pub staging: u64,
    pub images: usize,
}

/// A held `flock`; released on drop.
pub(crate) struct Lock(#[allow(dead_code)] File);

/// A staging path removed on drop unless kept.
pub(crate) struct Staged {
    pub path: PathBuf,
    keep: bool,
}

impl Staged {
    pub fn at(path: PathBuf) -> Staged {
        Staged { path, keep: false }
    }

    pub fn keep(mut self) -> PathBuf {
        self.keep = true;
        std::mem::take(&mut self.path)
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.keep {
            let _ = match fs::symlink_metadata(&self.path) {
                Ok(m) if m.is_dir() => fs::remove_dir_all(&self.path),
                Ok(_) => fs::remove_file(&self.path),
                Err(_) => Ok(()),
            };
        }
    }
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A name unique to this process and call.
pub(crate) fn unique(prefix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    format!("{prefix}-{}-{n}-{t:08x}", std::process::id())
}

/// Removes a directory tree, unmounting anything mounted inside it first (best effort).
pub fn remove_tree(dir: &Path) {
    crate::rootfs::unmount_all_under(dir);
    let _ = fs::remove_dir_all(dir);
}

/// Adds ":latest" to a name without a tag and checks the characters.
pub fn normalize_name(name: &str) -> Result<String> {
    let ok = !name.is_empty()
        && name.len() <= 255
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "._-/:@".contains(c))
        && !name.starts_with(['/', ':', '.', '-']);
    if !ok {
        return Err(Error::invalid(
            format!("image name {name:?}"),
            "use letters, digits and . _ - / : (for example busybox:latest or 127.0.0.1:5000/app:1)",
        ));
    }
    let last = name.rsplit('/').next().unwrap_or(name);
    if last.contains(':') || last.contains('@') {
        Ok(name.to_string())
    } else {
        Ok(format!("{name}:latest"))
    }
}

pub(crate) fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).at(dir)
}

/// Reads a whole file, refusing more than `limit` bytes.
pub(crate) fn read_limited(path: &Path, limit: u64) -> Result<Vec<u8>> {
    let f = File::open(path).at(path)?;
    let mut buf = Vec::new();
    f.take(limit + 1).read_to_end(&mut buf).at(path)?;
    if buf.len() as u64 > limit {
        return Err(Error::invalid(path.display().to_string(), format!("larger than {limit} bytes")));
    }
    Ok(buf)
}

/// Allocated bytes under `dir`, each inode counted once.
fn du(dir: &Path, seen: &mut BTreeSet<(u64, u64)>) -> u64 {
    let mut total = 0;
    let Ok(rd) = fs::read_dir(dir) else { return 0 };
    for e in rd.flatten() {
        let Ok(m) = e.metadata() else { continue };
        if seen.insert((m.dev(), m.ino())) {
            total += m.blocks() * 512;
        }
        if m.is_dir() {
            total += du(&e.path(), seen);
        }
    }
    total
}

impl Store {
    /// Opens (creating if needed) the store at `root`.
    pub fn open(root: impl Into<PathBuf>) -> Result<Store> {
        let root: PathBuf = root.into();
        for d in ["blobs/sha256", "layers", "containers", "cache/build", "tmp"] {
            let p = root.join(d);
            fs::create_dir_all(&p).at(&p)?;
        }
        let store = Store { root, progress: Arc::new(Quiet) };
        let layout = store.root.join("oci-layout");
        if !layout.exists() {
            store.write_atomic(&layout, br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        }
        let index = store.root.join("index.json");
        if !index.exists() {
            store.write_index(&empty_index())?;
        }
        Ok(store)
    }

    /// The store named by `ISLA_IMAGE_ROOT`, or [`DEFAULT_ROOT`].
    pub fn default_root() -> PathBuf {
        std::env::var_os("ISLA_IMAGE_ROOT").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(DEFAULT_ROOT))
    }

    /// Reports long work to `progress`.
    pub fn with_progress(mut self, progress: Arc<dyn Progress>) -> Store {
        self.progress = progress;
        self
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub(crate) fn progress(&self) -> &dyn Progress {
        self.progress.as_ref()
    }

    pub(crate) fn lock(&self, name: &str, exclusive: bool) -> Result<Lock> {
        let path = self.root.join(name);
        let f = fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path).at(&path)?;
        let op =
            if exclusive { rustix::fs::FlockOperation::LockExclusive } else { rustix::fs::FlockOperation::LockShared };
        rustix::fs::flock(&f, op).at(&path)?;
        Ok(Lock(f))
    }

    /// Held shared by every operation that adds content (so GC never sees half-added content).
    pub(crate) fn writer_lock(&self) -> Result<Lock> {
        self.lock("gc.lock", false)
    }

    /// A fresh path in the staging directory, removed on drop unless kept.
    pub(crate) fn staged(&self, prefix: &str) -> Staged {
        Staged { path: self.root.join("tmp").join(unique(prefix)), keep: false }
    }

    /// Writes `bytes` to `path` through a synced temporary file and a rename.
    pub(crate) fn write_atomic(&self, path: &Path, bytes: &[u8]) -> Result<()> {
        let tmp = self.staged("write");
        let mut f = File::create(&tmp.path).at(&tmp.path)?;
        f.write_all(bytes).and_then(|()| f.sync_all()).at(&tmp.path)?;
        fs::rename(&tmp.path, path).at(path)?;
        tmp.keep();
        if let Some(dir) = path.parent() {
            fsync_dir(dir)?;
        }
        Ok(())
    }

    // ---- blobs ----

    pub fn blob_path(&self, d: &Digest) -> Result<PathBuf> {
        Ok(self.root.join("blobs/sha256").join(digest::sha256_hex(d)?))
    }

    pub fn has_blob(&self, d: &Digest) -> bool {
        self.blob_path(d).map(|p| p.is_file()).unwrap_or(false)
    }

    pub fn open_blob(&self, d: &Digest) -> Result<File> {
        let p = self.blob_path(d)?;
        File::open(&p).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => {
                Error::invalid(d.to_string(), "blob is missing from the store (run `isla image fsck`)")
            }
            _ => Error::Io { path: p.clone(), source: e },
        })
    }

    /// A JSON blob (manifest, config, index), size-limited.
    pub fn read_blob(&self, d: &Digest) -> Result<Vec<u8>> {
        let p = self.blob_path(d)?;
        if !p.is_file() {
            return Err(Error::invalid(d.to_string(), "blob is missing from the store (run `isla image fsck`)"));
        }
        read_limited(&p, MAX_JSON)
    }

    /// Moves a finished, synced staging file into `blobs/` under `d`.
    pub(crate) fn commit_blob(&self, tmp: Staged, d: &Digest) -> Result<PathBuf> {
        let target = self.blob_path(d)?;
        if !target.exists() {
            fs::rename(&tmp.path, &target).at(&target)?;
            tmp.keep();
            fsync_dir(target.parent().unwrap_or(&self.root))?;
        }
        Ok(target)
    }

    /// Streams `r` into the store. With `expected`, content that hashes differently is refused
    /// and nothing is kept. `what` names the content in errors and progress.
    pub fn put_blob(
        &self,
        r: impl Read,
        expected: Option<&Digest>,
        what: &str,
        total: Option<u64>,
    ) -> Result<(Digest, u64)> {
        if let Some(d) = expected {
            if self.has_blob(d) {
                return Ok((d.clone(), fs::metadata(self.blob_path(d)?).at(&self.root)?.len()));
            }
        }
        let tmp = self.staged("blob");
        let f = File::create(&tmp.path).at(&tmp.path)?;
        let mut w = HashingWriter::new(BufWriter::with_capacity(1 << 20, f));
        self.progress.start(what, total);
        let mut r = ProgressReader { inner: r, progress: self.progress() };
        let copied = io::copy(&mut r, &mut w);
        self.progress.finish();
        copied.map_err(|e| Error::invalid(what, format!("reading failed: {e}")))?;
        let (bw, d, n) = w.finish();
        let f = bw.into_inner().map_err(|e| e.into_error()).at(&tmp.path)?;
        f.sync_all().at(&tmp.path)?;
        if let Some(exp) = expected {
            digest::verify(what, exp, &d)?;
        }
        self.commit_blob(tmp, &d)?;
        Ok((d, n))
    }

    pub fn put_blob_bytes(&self, bytes: &[u8]) -> Result<Digest> {
        let d = digest::of_bytes(bytes);
        if !self.has_blob(&d) {
            let tmp = self.staged("blob");
            let mut f = File::create(&tmp.path).at(&tmp.path)?;
            f.write_all(bytes).and_then(|()| f.sync_all()).at(&tmp.path)?;
            self.commit_blob(tmp, &d)?;
        }
        Ok(d)
    }

    /// Writes a new gzip layer from a tar producer and unpacks it. Returns its descriptor.
    pub fn add_layer(&self, produce: impl FnOnce(&mut dyn Write) -> Result<()>) -> Result<LayerDesc> {
        let tmp = self.staged("layer");
        let f = File::create(&tmp.path).at(&tmp.path)?;
        let blob_w = HashingWriter::new(BufWriter::with_capacity(1 << 20, f));
        let gz = GzEncoder::new(blob_w, flate2::Compression::new(3));
        let mut diff_w = HashingWriter::new(gz);
        produce(&mut diff_w)?;
        let (gz, diff_id, _) = diff_w.finish();
        let blob_w = gz.finish().at(&tmp.path)?;
        let (bw, d, size) = blob_w.finish();
        let f = bw.into_inner().map_err(|e| e.into_error()).at(&tmp.path)?;
        f.sync_all().at(&tmp.path)?;
        self.commit_blob(tmp, &d)?;
        let desc = LayerDesc { digest: d, size, diff_id, media_type: MediaType::ImageLayerGzip.to_string() };
        self.ensure_unpacked(&desc)?;
        Ok(desc)
    }

    // ---- layers ----

    /// The directory holding the unpacked layer with this diff_id.
    pub fn layer_dir(&self, diff_id: &Digest) -> Result<PathBuf> {
        Ok(self.root.join("layers").join(digest::sha256_hex(diff_id)?))
    }

    /// Unpacks a layer blob (once) and checks that its uncompressed content hashes to `diff_id`.
    pub fn ensure_unpacked(&self, l: &LayerDesc) -> Result<PathBuf> {
        let dir = self.layer_dir(&l.diff_id)?;
        if dir.is_dir() {
            return Ok(dir);
        }
        let tmp = Staged { path: self.root.join("layers").join(unique(".tmp")), keep: false };
        fs::create_dir(&tmp.path).at(&tmp.path)?;
        let blob = self.open_blob(&l.digest)?;
        let total = blob.metadata().ok().map(|m| m.len());
        self.progress.start(&format!("unpack {}", short(&l.digest)), total);
        let r = ProgressReader { inner: blob, progress: self.progress() };
        let res = layer::unpack(r, &tmp.path, l.digest.as_ref());
        self.progress.finish();
        let (diff_id, _) = res?;
        digest::verify(&format!("layer {} (diff_id)", l.digest), &l.diff_id, &diff_id)?;
        match fs::rename(&tmp.path, &dir) {
            Ok(()) => {
                tmp.keep();
            }
            // Another process unpacked the same layer meanwhile: keep theirs.
            Err(_) if dir.is_dir() => {}
            Err(e) => return Err(Error::Io { path: dir, source: e }),
        }
        Ok(dir)
    }

    /// The layers of an image with their diff_ids (from the configuration).
    pub fn layers_of(&self, img: &Image) -> Result<Vec<LayerDesc>> {
        let diff_ids = img.config.rootfs().diff_ids();
        let layers = img.manifest.layers();
        if diff_ids.len() != layers.len() {
            return Err(Error::invalid(
                format!("image {}", img.digest),
                format!("manifest has {} layers but the configuration lists {} diff_ids", layers.len(), diff_ids.len()),
            ));
        }
        layers
            .iter()
            .zip(diff_ids)
            .map(|(l, d)| {
                Ok(LayerDesc {
                    digest: l.digest().clone(),
                    size: l.size(),
                    diff_id: digest::parse(d, "configuration rootfs.diff_ids")?,
                    media_type: l.media_type().to_string(),
                })
            })
            .collect()
    }

    // ---- index and names ----

    pub(crate) fn read_index(&self) -> Result<ImageIndex> {
        let p = self.root.join("index.json");
        let bytes = read_limited(&p, MAX_JSON)?;
        serde_json::from_slice(&bytes)
            .map_err(|e| Error::invalid(p.display().to_string(), format!("not an OCI index: {e}")))
    }

    fn write_index(&self, idx: &ImageIndex) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(idx).map_err(|e| Error::invalid("index.json", e.to_string()))?;
        self.write_atomic(&self.root.join("index.json"), &bytes)
    }

    /// Read-modify-write of index.json under its lock.
    fn update_index(&self, f: impl FnOnce(&mut Vec<Descriptor>)) -> Result<()> {
        let _l = self.lock("index.lock", true)?;
        let mut idx = self.read_index()?;
        let mut m = idx.manifests().clone();
        f(&mut m);
        idx.set_manifests(m);
        self.write_index(&idx)
    }

    /// Points `name` (normalized) at the manifest `desc`; `None` adds the manifest unnamed.
    pub fn tag(&self, name: Option<&str>, desc: &Descriptor) -> Result<()> {
        let name = name.map(normalize_name).transpose()?;
        self.update_index(|m| {
            let d = desc.digest().clone();
            m.retain(|e| match (&name, ref_name(e)) {
                (Some(n), Some(en)) => en != n,
                (_, None) => e.digest() != &d,
                (None, Some(_)) => true,
            });
            if name.is_none() && m.iter().any(|e| e.digest() == &d) {
                return;
            }
            let mut e = Descriptor::new(MediaType::ImageManifest, desc.size(), d);
            e.set_media_type(desc.media_type().clone());
            if let Some(n) = &name {
                e.set_annotations(Some(HashMap::from([(REF_NAME.to_string(), n.clone())])));
            }
            m.push(e);
        })
    }

    /// Stores a configuration and manifest for `layers` and names it. Returns the manifest digest.
    pub fn commit_image(
        &self,
        config: &ImageConfiguration,
        layers: &[LayerDesc],
        name: Option<&str>,
    ) -> Result<Digest> {
        let cbytes = serde_json::to_vec(config).map_err(|e| Error::invalid("image configuration", e.to_string()))?;
        let cd = self.put_blob_bytes(&cbytes)?;
        let desc = self.put_manifest(&cd, cbytes.len() as u64, layers)?;
        self.tag(name, &desc)?;
        Ok(desc.digest().clone())
    }

    /// Reads an image by manifest digest.
    pub fn load_image(&self, d: &Digest, names: Vec<String>) -> Result<Image> {
        let mbytes = self.read_blob(d)?;
        let manifest: ImageManifest = serde_json::from_slice(&mbytes)
            .map_err(|e| Error::invalid(format!("manifest {d}"), format!("not an image manifest: {e}")))?;
        let cbytes = self.read_blob(manifest.config().digest())?;
        let config: ImageConfiguration = serde_json::from_slice(&cbytes).map_err(|e| {
            Error::invalid(format!("config {}", manifest.config().digest()), format!("not an image configuration: {e}"))
        })?;
        let size = manifest.config().size() + manifest.layers().iter().map(|l| l.size()).sum::<u64>();
        Ok(Image { names, digest: d.clone(), manifest, config, size })
    }

    /// Finds an image by name ("busybox", "app:1"), full digest or unique digest prefix.
    pub fn resolve(&self, what: &str) -> Result<Image> {
        let idx = self.read_index()?;
        let hexpart = what.strip_prefix("sha256:").unwrap_or(what);
        let by_digest = hexpart.len() >= 6 && hexpart.chars().all(|c| c.is_ascii_hexdigit());
        let mut found: Option<Digest> = None;
        if by_digest {
            for e in idx.manifests() {
                if e.digest().digest().starts_with(hexpart) {
                    if found.as_ref().is_some_and(|f| f != e.digest()) {
                        return Err(Error::invalid(what, "digest prefix is ambiguous; give more digits"));
                    }
                    found = Some(e.digest().clone());
                }
            }
        }
        if found.is_none() {
            let name = normalize_name(what)?;
            found = idx.manifests().iter().find(|e| ref_name(e) == Some(&name)).map(|e| e.digest().clone());
        }
        let d = found.ok_or_else(|| Error::NotFound(what.to_string()))?;
        let names = idx.manifests().iter().filter(|e| e.digest() == &d).filter_map(ref_name).cloned().collect();
        self.load_image(&d, names)
    }

    /// Every image in the store.
    pub fn list(&self) -> Result<Vec<Image>> {
        let idx = self.read_index()?;
        let mut by: BTreeMap<String, (Digest, Vec<String>)> = BTreeMap::new();
        for e in idx.manifests() {
            let ent = by.entry(e.digest().to_string()).or_insert_with(|| (e.digest().clone(), Vec::new()));
            if let Some(n) = ref_name(e) {
                ent.1.push(n.clone());
            }
        }
        by.into_values().map(|(d, names)| self.load_image(&d, names)).collect()
    }

    /// Removes a name (or, given a digest, every name of that image), then collects garbage.
    pub fn remove(&self, what: &str) -> Result<GcReport> {
        let img = self.resolve(what)?;
        let name = normalize_name(what).ok();
        let by_name = name.as_ref().is_some_and(|n| img.names.contains(n));
        self.update_index(|m| {
            m.retain(|e| if by_name { ref_name(e) != name.as_ref() } else { e.digest() != &img.digest });
        })?;
        self.gc()
    }

    /// Removes unnamed images, then collects garbage; with `build_cache` also the build cache.
    pub fn prune(&self, build_cache: bool) -> Result<GcReport> {
        self.update_index(|m| m.retain(|e| ref_name(e).is_some()))?;
        if build_cache {
            let _g = self.lock("gc.lock", true)?;
            let dir = self.root.join("cache/build");
            fs::remove_dir_all(&dir).at(&dir)?;
            fs::create_dir_all(&dir).at(&dir)?;
        }
        self.gc()
    }

    /// Blob digests and diff_ids that are in use: by named images, the build cache and
    /// prepared container root filesystems.
    fn live(&self) -> Result<(BTreeSet<String>, BTreeSet<String>)> {
        let mut blobs = BTreeSet::new();
        let mut layers = BTreeSet::new();
        for img in self.list()? {
            blobs.insert(img.digest.digest().to_string());
            blobs.insert(img.manifest.config().digest().digest().to_string());
            for l in self.layers_of(&img)? {
                blobs.insert(l.digest.digest().to_string());
                layers.insert(l.diff_id.digest().to_string());
            }
        }
        for l in crate::build::cached_layers(self)? {
            blobs.insert(l.digest.digest().to_string());
            layers.insert(l.diff_id.digest().to_string());
        }
        for diff_ids in crate::rootfs::container_layers(self)? {
            layers.extend(diff_ids);
        }
        Ok((blobs, layers))
    }

    /// Deletes blobs and unpacked layers nothing refers to, and staging leftovers.
    pub fn gc(&self) -> Result<GcReport> {
        let _g = self.lock("gc.lock", true)?;
        let (blobs, layers) = self.live()?;
        let mut r = GcReport::default();
        let mut seen = BTreeSet::new();
        let bdir = self.root.join("blobs/sha256");
        for e in fs::read_dir(&bdir).at(&bdir)?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !blobs.contains(&name) {
                r.bytes_freed += e.metadata().map(|m| m.len()).unwrap_or(0);
                fs::remove_file(e.path()).at(&e.path())?;
                r.blobs_removed += 1;
            }
        }
        let ldir = self.root.join("layers");
        for e in fs::read_dir(&ldir).at(&ldir)?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !layers.contains(&name) {
                r.bytes_freed += du(&e.path(), &mut seen);
                fs::remove_dir_all(e.path()).at(&e.path())?;
                if name.starts_with(".tmp") {
                    r.staging_removed += 1;
                } else {
                    r.layers_removed += 1;
                }
            }
        }
        let vdir = self.root.join(crate::vmdisk::DIR);
        for e in fs::read_dir(&vdir).into_iter().flatten().flatten() {
            if !crate::vmdisk::is_live(&e.file_name().to_string_lossy(), &blobs) {
                r.bytes_freed += e.metadata().map(|m| m.blocks() * 512).unwrap_or(0);
                fs::remove_file(e.path()).at(&e.path())?;
                r.vm_disks_removed += 1;
            }
        }
        let tdir = self.root.join("tmp");
        for e in fs::read_dir(&tdir).at(&tdir)?.flatten() {
            let p = e.path();
            r.bytes_freed += du(&p, &mut seen) + e.metadata().map(|m| m.blocks() * 512).unwrap_or(0);
            crate::rootfs::unmount_all_under(&p);
            let res = if p.is_dir() { fs::remove_dir_all(&p) } else { fs::remove_file(&p) };
            res.at(&p)?;
            r.staging_removed += 1;
        }
        Ok(r)
    }

    /// Checks that every named image is complete and every blob matches its digest. With
    /// `repair`, removes what is unreferenced (as [`Store::gc`] does) afterwards.
    pub fn fsck(&self, repair: bool) -> Result<FsckReport> {
        let mut r = FsckReport::default();
        let layout = self.root.join("oci-layout");
        match read_limited(&layout, MAX_JSON).map(|b| serde_json::from_slice::<OciLayout>(&b)) {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => r.errors.push(format!("oci-layout: {e}")),
            Err(e) => r.errors.push(e.to_string()),
        }
        let idx = match self.read_index() {
            Ok(i) => i,
            Err(e) => {
                r.errors.push(e.to_string());
                return Ok(r);
            }
        };
        let mut referenced = BTreeSet::new();
        for e in idx.manifests() {
            let label = ref_name(e).cloned().unwrap_or_else(|| e.digest().to_string());
            let img = match self.load_image(e.digest(), vec![]) {
                Ok(i) => i,
                Err(err) => {
                    r.errors.push(format!("image {label}: {err}"));
                    continue;
                }
            };
            r.images += 1;
            referenced.insert(img.digest.digest().to_string());
            referenced.insert(img.manifest.config().digest().digest().to_string());
            match self.layers_of(&img) {
                Ok(ls) => {
                    for l in ls {
                        referenced.insert(l.digest.digest().to_string());
                        if !self.has_blob(&l.digest) {
                            r.errors.push(format!("image {label}: layer blob {} is missing", l.digest));
                        }
                    }
                }
                Err(err) => r.errors.push(format!("image {label}: {err}")),
            }
        }
        let bdir = self.root.join("blobs/sha256");
        for e in fs::read_dir(&bdir).at(&bdir)?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            r.blobs_checked += 1;
            let actual = File::open(e.path()).and_then(|f| digest::HashingReader::new(f).drain());
            match actual {
                Ok((d, _)) if d.digest() == name => {}
                Ok((d, _)) => r.errors.push(format!("blob {name}: content hashes to {d}")),
                Err(err) => r.errors.push(format!("blob {name}: {err}")),
            }
            if !referenced.contains(&name) {
                r.leftovers.push(format!("blob {name} is not referenced by any named image"));
            }
        }
        for (dir, what) in [("tmp", "staging file"), ("layers", "partly unpacked layer")] {
            let d = self.root.join(dir);
            for e in fs::read_dir(&d).at(&d)?.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if dir == "tmp" || name.starts_with(".tmp") {
                    r.leftovers.push(format!("{what} {dir}/{name} (interrupted work)"));
                }
            }
        }
        if repair && r.is_consistent() {
            self.gc()?;
        }
        Ok(r)
    }

    /// Space used by each part of the store.
    pub fn disk_usage(&self) -> Result<DiskUsage> {
        let mut seen = BTreeSet::new();
        Ok(DiskUsage {
            blobs: du(&self.root.join("blobs"), &mut seen),
            layers: du(&self.root.join("layers"), &mut seen),
            containers: du(&self.root.join("containers"), &mut seen),
            staging: du(&self.root.join("tmp"), &mut seen),
            images: self.list()?.len(),
        })
    }
}

fn empty_index() -> ImageIndex {
    serde_json::from_value(
        serde_json::json!({"schemaVersion": 2, "mediaType": MediaType::ImageIndex.to_string(), "manifests": []}),
    )
    .unwrap_or_default()
}

/// The name annotation of an index entry.
pub(crate) fn ref_name(e: &Descriptor) -> Option<&String> {
    e.annotations().as_ref().and_then(|a| a.get(REF_NAME))
}

/// First 12 hex digits of a digest, for display.
pub fn short(d: &Digest) -> &str {
    let h = d.digest();
    &h[..h.len().min(12)]
}
