//! Import and export: OCI image layout directories and tarballs, and `docker save` archives.
//!
//! A tarball is read in one pass: every `blobs/sha256/<hex>` entry is streamed into the store
//! and checked against the digest its name announces; other large files (the `layer.tar` of
//! old `docker save` archives) are stored under the digest they hash to; small files (JSON) are
//! kept in memory. Names inside the archive are only ever looked up, never used as paths, so
//! `../` in an archive cannot write anywhere. Then the manifests are assembled, every layer is
//! unpacked and checked against the configuration's diff_ids, and only then are the names added
//! to the index: an import that fails or is killed names nothing.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Component, Path, PathBuf};

use oci_spec::image::{Descriptor, Digest, ImageConfiguration, ImageIndex, MediaType};
use serde::{Deserialize, Serialize};

use crate::digest;
use crate::error::{Error, IoContext, Result};
use crate::layer;
use crate::progress::ProgressReader;
use crate::store::{normalize_name, ref_name, short, LayerDesc, Store, MAX_JSON};

/// Files at most this big are kept in memory while reading an archive.
const SMALL: u64 = 4 << 20;

/// Export format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// OCI image layout tarball (`oci-layout`, `index.json`, `blobs/`).
    Oci,
    /// `docker save` tarball (`manifest.json`, uncompressed layers) for `docker load`.
    Docker,
}

/// One entry of a `docker save` manifest.json.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

/// An imported image.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub digest: Digest,
    pub names: Vec<String>,
}

/// Where archive members come from.
enum Source<'a> {
    Tar { small: HashMap<String, Vec<u8>>, big: HashMap<String, Digest>, links: HashMap<String, String> },
    Dir(&'a Path),
}

/// "./a/b" -> "a/b"; `None` for names that climb out (`..`) or are absolute.
fn clean(name: &str) -> Option<String> {
    let mut parts: Vec<&str> = Vec::new();
    for c in Path::new(name).components() {
        match c {
            Component::Normal(p) => parts.push(p.to_str()?),
            Component::CurDir => {}
            _ => return None,
        }
    }
    Some(parts.join("/"))
}

impl Source<'_> {
    fn small(&self, name: &str) -> Result<Option<Vec<u8>>> {
        match self {
            Source::Tar { small, .. } => Ok(small.get(name).cloned()),
            Source::Dir(d) => {
                let p = d.join(name);
                if p.is_file() {
                    crate::store::read_limited(&p, MAX_JSON).map(Some)
                } else {
                    Ok(None)
                }
            }
        }
    }

    /// Makes sure the member `name` is in the store (checked against `expected`) and returns
    /// its digest.
    fn blob(&self, store: &Store, name: &str, expected: Option<&Digest>) -> Result<Digest> {
        let missing = || Error::invalid(name, "the archive has no such file (it is named in a manifest)");
        let cname = clean(name)
            .ok_or_else(|| Error::invalid(name, "path leaves the archive (`..` or absolute); refusing it"))?;
        let d = match self {
            Source::Tar { small, big, links } => {
                let mut n = cname;
                for _ in 0..8 {
                    match links.get(&n) {
                        Some(t) => n = t.clone(),
                        None => break,
                    }
                }
                if let Some(d) = big.get(&n) {
                    d.clone()
                } else if let Some(bytes) = small.get(&n) {
                    store.put_blob_bytes(bytes)?
                } else {
                    return Err(missing());
                }
            }
            Source::Dir(dir) => {
                let p = dir.join(&cname);
                let f = File::open(&p).map_err(|_| missing())?;
                let total = f.metadata().ok().map(|m| m.len());
                store.put_blob(f, expected, name, total)?.0
            }
        };
        if let Some(e) = expected {
            digest::verify(name, e, &d)?;
        }
        Ok(d)
    }
}

/// Reads a tarball in one pass (see the module documentation).
fn read_tar<'a>(store: &Store, path: &Path) -> Result<Source<'a>> {
    let f = File::open(path).at(path)?;
    let total = f.metadata().ok().map(|m| m.len());
    let what = path.display().to_string();
    store
        .progress()
        .start(&format!("read {}", path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default()), total);
    let reader = layer::decompress(ProgressReader { inner: f, progress: store.progress() }, &what)?;
    let mut ar = tar::Archive::new(reader);
    let (mut small, mut big, mut links) = (HashMap::new(), HashMap::new(), HashMap::new());
    let quiet = store.clone().with_progress(std::sync::Arc::new(crate::progress::Quiet));
    let entries = ar.entries().map_err(|e| Error::invalid(&what, format!("not a tar archive: {e}")))?;
    for entry in entries {
        let mut e = entry.map_err(|e| Error::invalid(&what, format!("corrupt tar archive: {e}")))?;
        let raw = String::from_utf8_lossy(&e.path_bytes()).into_owned();
        let Some(name) = clean(&raw) else { continue };
        let kind = e.header().entry_type();
        if kind.is_symlink() || kind.is_hard_link() {
            if let Some(t) = e.link_name_bytes() {
                let t = String::from_utf8_lossy(&t).into_owned();
                let base = if kind.is_symlink() {
                    Path::new(&name).parent().unwrap_or(Path::new("")).join(&t)
                } else {
                    PathBuf::from(&t)
                };
                if let Some(target) = base.to_str().and_then(clean_dots) {
                    links.insert(name, target);
                }
            }
            continue;
        }
        if !kind.is_file() {
            continue;
        }
        let size = e.size();
        let member = format!("{what}: {name}");
        if let Some(hex) = name.strip_prefix("blobs/sha256/") {
            let expected = digest::parse(&format!("sha256:{hex}"), &member)?;
            let (d, _) = quiet.put_blob(&mut e, Some(&expected), &member, Some(size))?;
            big.insert(name, d);
        } else if size <= SMALL {
            let mut buf = Vec::with_capacity(size as usize);
            e.read_to_end(&mut buf).map_err(|er| Error::invalid(&member, er.to_string()))?;
            small.insert(name, buf);
        } else {
            let (d, _) = quiet.put_blob(&mut e, None, &member, Some(size))?;
            big.insert(name, d);
        }
    }
    store.progress().finish();
    Ok(Source::Tar { small, big, links })
}

/// Resolves "a/../b" style link targets; `None` if they climb out.
fn clean_dots(p: &str) -> Option<String> {
    let mut out: Vec<&str> = Vec::new();
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                out.pop()?;
            }
            c => out.push(c),
        }
    }
    Some(out.join("/"))
}

/// Guesses a layer's media type from its first bytes.
fn layer_media_type(store: &Store, d: &Digest) -> Result<String> {
    let mut head = [0u8; 4];
    let mut f = store.open_blob(d)?;
    let n = f.read(&mut head).at(&store.blob_path(d)?)?;
    Ok(if n >= 2 && head[..2] == [0x1f, 0x8b] { MediaType::ImageLayerGzip } else { MediaType::ImageLayer }.to_string())
}

fn parse_json<T: serde::de::DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| Error::invalid(what, format!("malformed JSON: {e}")))
}

/// Imports an OCI layout directory or tarball, or a `docker save` archive (optionally gzip
/// compressed).
pub fn load(store: &Store, path: &Path) -> Result<Vec<Loaded>> {
    let _w = store.writer_lock()?;
    let src = if path.is_dir() { Source::Dir(path) } else { read_tar(store, path)? };
    let what = path.display().to_string();
    let mut out = Vec::new();
    if let Some(bytes) = src.small("manifest.json")? {
        let entries: Vec<DockerEntry> = parse_json(&bytes, &format!("{what}: manifest.json"))?;
        for e in entries {
            let cd = src.blob(store, &e.config, None)?;
            let cbytes = store.read_blob(&cd)?;
            let config: ImageConfiguration = parse_json(&cbytes, &format!("{what}: {}", e.config))?;
            let diff_ids = config.rootfs().diff_ids();
            if diff_ids.len() != e.layers.len() {
                return Err(Error::invalid(
                    &what,
                    format!(
                        "manifest.json lists {} layers, the configuration {} diff_ids",
                        e.layers.len(),
                        diff_ids.len()
                    ),
                ));
            }
            let mut layers = Vec::new();
            for (lp, diff) in e.layers.iter().zip(diff_ids) {
                let d = src.blob(store, lp, None)?;
                let size = fs::metadata(store.blob_path(&d)?).at(&store.blob_path(&d)?)?.len();
                let media_type = layer_media_type(store, &d)?;
                layers.push(LayerDesc {
                    digest: d,
                    size,
                    diff_id: digest::parse(diff, "rootfs.diff_ids")?,
                    media_type,
                });
            }
            for l in &layers {
                store.ensure_unpacked(l)?;
            }
            let names: Vec<String> =
                e.repo_tags.unwrap_or_default().iter().map(|n| normalize_name(n)).collect::<Result<_>>()?;
            let desc = store.put_manifest(&cd, cbytes.len() as u64, &layers)?;
            tag_all(store, &names, &desc)?;
            out.push(Loaded { digest: desc.digest().clone(), names });
        }
    } else if let Some(bytes) = src.small("index.json")? {
        let index: ImageIndex = parse_json(&bytes, &format!("{what}: index.json"))?;
        for m in index.manifests() {
            let name = ref_name(m).map(|n| normalize_name(n)).transpose()?;
            let desc = resolve_manifest(store, &src, m, 0)?;
            let img = store.load_image(desc.digest(), vec![])?;
            src.blob(store, &blob_name(img.manifest.config().digest())?, Some(img.manifest.config().digest()))?;
            for l in store.layers_of(&img)? {
                src.blob(store, &blob_name(&l.digest)?, Some(&l.digest))?;
                store.ensure_unpacked(&l)?;
            }
            let names: Vec<String> = name.into_iter().collect();
            tag_all(store, &names, &desc)?;
            out.push(Loaded { digest: desc.digest().clone(), names });
        }
    } else {
        return Err(Error::invalid(
            &what,
            "neither manifest.json (docker save) nor index.json (OCI image layout) found",
        ));
    }
    Ok(out)
}

fn tag_all(store: &Store, names: &[String], desc: &Descriptor) -> Result<()> {
    if names.is_empty() {
        return store.tag(None, desc);
    }
    for n in names {
        store.tag(Some(n), desc)?;
    }
    Ok(())
}

fn blob_name(d: &Digest) -> Result<String> {
    Ok(format!("blobs/sha256/{}", digest::sha256_hex(d)?))
}

/// Whether an index entry is for linux/amd64 (entries without a platform count as a match).
pub(crate) fn is_linux_amd64(d: &Descriptor) -> bool {
    d.platform().as_ref().is_none_or(|p| p.os().to_string() == "linux" && p.architecture().to_string() == "amd64")
}

fn is_index(mt: &str) -> bool {
    mt == MediaType::ImageIndex.to_string() || mt == "application/vnd.docker.distribution.manifest.list.v2+json"
}

/// Follows nested indexes down to the linux/amd64 image manifest; returns its descriptor.
fn resolve_manifest(store: &Store, src: &Source, d: &Descriptor, depth: usize) -> Result<Descriptor> {
    if depth > 4 {
        return Err(Error::invalid(d.digest().to_string(), "image indexes nested too deeply"));
    }
    src.blob(store, &blob_name(d.digest())?, Some(d.digest()))?;
    if !is_index(d.media_type().as_ref()) {
        return Ok(d.clone());
    }
    let idx: ImageIndex = parse_json(&store.read_blob(d.digest())?, &format!("index {}", d.digest()))?;
    let pick = idx
        .manifests()
        .iter()
        .find(|m| is_linux_amd64(m))
        .ok_or_else(|| Error::invalid(format!("index {}", d.digest()), "has no linux/amd64 image"))?;
    resolve_manifest(store, src, pick, depth + 1)
}

impl Store {
    /// Stores a manifest for an already stored configuration and layers; returns its descriptor.
    pub fn put_manifest(&self, config: &Digest, config_size: u64, layers: &[LayerDesc]) -> Result<Descriptor> {
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": MediaType::ImageManifest.to_string(),
            "config": Descriptor::new(MediaType::ImageConfig, config_size, config.clone()),
            "layers": layers.iter().map(LayerDesc::descriptor).collect::<Vec<_>>(),
        });
        let bytes = serde_json::to_vec(&manifest).map_err(|e| Error::invalid("image manifest", e.to_string()))?;
        let d = self.put_blob_bytes(&bytes)?;
        Ok(Descriptor::new(MediaType::ImageManifest, bytes.len() as u64, d))
    }
}

/// Adds a file from the store (or any reader of known size) to a tarball.
fn append(b: &mut tar::Builder<File>, name: &str, size: u64, r: impl Read, store: &Store) -> io::Result<()> {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o644);
    h.set_size(size);
    h.set_mtime(0);
    store.progress().start(
        &format!("write {}", name.strip_prefix("blobs/sha256/").map(|s| &s[..12.min(s.len())]).unwrap_or(name)),
        Some(size),
    );
    let r = b.append_data(&mut h, name, ProgressReader { inner: r, progress: store.progress() });
    store.progress().finish();
    r
}

/// Writes the images `what` (names or digests) to the tarball `out` (replaced atomically).
pub fn save(store: &Store, what: &[String], out: &Path, format: Format) -> Result<()> {
    let _w = store.writer_lock()?;
    let images: Vec<_> = what.iter().map(|w| store.resolve(w).map(|i| (w.clone(), i))).collect::<Result<_>>()?;
    let tmp_path = out.with_extension(format!("tmp-{}", std::process::id()));
    let tmp = crate::store::Staged::at(tmp_path.clone());
    let f = File::create(&tmp_path).at(&tmp_path)?;
    let mut b = tar::Builder::new(f);
    let w = |e: io::Error| Error::Io { path: tmp_path.clone(), source: e };
    let mut written = std::collections::HashSet::new();
    let put = |b: &mut tar::Builder<File>, written: &mut std::collections::HashSet<String>, d: &Digest| -> Result<()> {
        let name = blob_name(d)?;
        if written.insert(name.clone()) {
            let f = store.open_blob(d)?;
            let size = f.metadata().at(&store.blob_path(d)?)?.len();
            append(b, &name, size, f, store).map_err(w)?;
        }
        Ok(())
    };
    match format {
        Format::Oci => {
            let mut entries = Vec::new();
            for (asked, img) in &images {
                put(&mut b, &mut written, &img.digest)?;
                put(&mut b, &mut written, img.manifest.config().digest())?;
                for l in img.manifest.layers() {
                    put(&mut b, &mut written, l.digest())?;
                }
                let name =
                    normalize_name(asked).ok().filter(|n| img.names.contains(n)).or_else(|| img.names.first().cloned());
                let mbytes = store.read_blob(&img.digest)?;
                let mut d = Descriptor::new(MediaType::ImageManifest, mbytes.len() as u64, img.digest.clone());
                if let Some(n) = name {
                    d.set_annotations(Some(HashMap::from([(crate::store::REF_NAME.to_string(), n)])));
                }
                entries.push(d);
            }
            let index = serde_json::json!({"schemaVersion": 2, "mediaType": MediaType::ImageIndex.to_string(), "manifests": entries});
            let ibytes = serde_json::to_vec_pretty(&index).map_err(|e| Error::invalid("index.json", e.to_string()))?;
            let layout = br#"{"imageLayoutVersion":"1.0.0"}"#;
            append(&mut b, "oci-layout", layout.len() as u64, &layout[..], store).map_err(w)?;
            append(&mut b, "index.json", ibytes.len() as u64, &ibytes[..], store).map_err(w)?;
        }
        Format::Docker => {
            let mut entries = Vec::new();
            for (asked, img) in &images {
                put(&mut b, &mut written, img.manifest.config().digest())?;
                let mut layers = Vec::new();
                for l in store.layers_of(img)? {
                    let name = blob_name(&l.diff_id)?;
                    if written.insert(name.clone()) {
                        // docker load wants uncompressed layers: stage the tar, then add it.
                        let staged = store.staged("save");
                        let mut sf = File::create(&staged.path).at(&staged.path)?;
                        let mut hr = digest::HashingReader::new(layer::decompress(
                            store.open_blob(&l.digest)?,
                            l.digest.as_ref(),
                        )?);
                        io::copy(&mut hr, &mut sf).at(&staged.path)?;
                        let (d, size) = hr.drain().at(&staged.path)?;
                        digest::verify(&format!("layer {}", short(&l.digest)), &l.diff_id, &d)?;
                        append(&mut b, &name, size, File::open(&staged.path).at(&staged.path)?, store).map_err(w)?;
                    }
                    layers.push(name);
                }
                let tags = match normalize_name(asked) {
                    Ok(n) if img.names.contains(&n) => vec![n],
                    _ => img.names.clone(),
                };
                entries.push(DockerEntry {
                    config: blob_name(img.manifest.config().digest())?,
                    repo_tags: Some(tags),
                    layers,
                });
            }
            let mbytes = serde_json::to_vec(&entries).map_err(|e| Error::invalid("manifest.json", e.to_string()))?;
            append(&mut b, "manifest.json", mbytes.len() as u64, &mbytes[..], store).map_err(w)?;
        }
    }
    let f = b.into_inner().map_err(w)?;
    f.sync_all().map_err(w)?;
    fs::rename(&tmp_path, out).at(out)?;
    tmp.keep();
    Ok(())
}
