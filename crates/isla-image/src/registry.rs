//! Pull and push over the OCI distribution API.
//!
//! Authentication follows the registry's `WWW-Authenticate` challenge: `Bearer realm=…,
//! service=…,scope=…` fetches a token from the realm (with basic credentials when given) and
//! retries; `Basic` retries with the credentials. Image indexes (and Docker manifest lists) are
//! resolved to the linux/amd64 manifest. Every manifest and blob is checked against its digest
//! before it is stored. Blob downloads go to `tmp/pull-<digest>.partial` and continue from where
//! they stopped with an HTTP `Range` request the next time. Pushes skip blobs the registry
//! already has (`HEAD`) and upload the others in one `PUT`.
//!
//! Plain HTTP is used for loopback registries (`localhost`, `127.*`, `[::1]`) or when asked
//! (`insecure`); HTTPS with the webpki roots otherwise.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::sync::Mutex;
use std::time::Duration;

use base64::Engine as _;
use oci_spec::image::{Digest, ImageIndex, ImageManifest, MediaType};
use sha2::{Digest as _, Sha256};

use crate::archive::is_linux_amd64;
use crate::digest;
use crate::error::{Error, IoContext, Result};
use crate::progress::ProgressReader;
use crate::store::{normalize_name, LayerDesc, Staged, Store, MAX_JSON};

const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// A parsed image reference: `[registry/]repository[:tag][@digest]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Reference {
    pub registry: String,
    pub repository: String,
    pub tag: String,
    pub digest: Option<Digest>,
}

impl Reference {
    pub fn parse(s: &str) -> Result<Reference> {
        let bad = |m: &str| Error::invalid(format!("image reference {s:?}"), m.to_string());
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) => (r, Some(digest::parse(d, s)?)),
            None => (s, None),
        };
        let (registry, path) = match rest.split_once('/') {
            Some((first, tail)) if first.contains(['.', ':']) || first == "localhost" => {
                (first.to_string(), tail.to_string())
            }
            _ => ("docker.io".to_string(), rest.to_string()),
        };
        let (repo, tag) = match path.rsplit_once(':') {
            Some((r, t)) if !t.contains('/') => (r.to_string(), t.to_string()),
            _ => (path.clone(), "latest".to_string()),
        };
        let repository = if registry == "docker.io" && !repo.contains('/') { format!("library/{repo}") } else { repo };
        let ok = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-/".contains(c);
        if repository.is_empty() || !repository.chars().all(ok) {
            return Err(bad("the repository must be lower-case letters, digits and . _ - /"));
        }
        Ok(Reference { registry, repository, tag, digest })
    }

    /// What the manifest is fetched by: the digest if given, else the tag.
    fn reference(&self) -> String {
        self.digest.as_ref().map(|d| d.to_string()).unwrap_or_else(|| self.tag.clone())
    }

    /// The local name for a pulled image ("registry/repo:tag", Docker Hub names short).
    pub fn local_name(&self) -> String {
        match self.registry.as_str() {
            "docker.io" => {
                format!("{}:{}", self.repository.strip_prefix("library/").unwrap_or(&self.repository), self.tag)
            }
            r => format!("{r}/{}:{}", self.repository, self.tag),
        }
    }
}

/// A registry client.
pub struct Client {
    agent: ureq::Agent,
    /// Use plain HTTP even for non-loopback registries.
    pub insecure: bool,
    /// Basic credentials (user, password) for the registry or its token server.
    pub credentials: Option<(String, String)>,
    tokens: Mutex<HashMap<String, String>>,
}

impl Default for Client {
    fn default() -> Self {
        Self::new()
    }
}

fn is_loopback(host: &str) -> bool {
    let h = host.rsplit_once(':').map(|(h, _)| h).unwrap_or(host);
    h == "localhost" || h.starts_with("127.") || h == "[::1]"
}

/// Parses `Bearer realm="…",service="…"` into its scheme and parameters.
fn parse_challenge(h: &str) -> (String, HashMap<String, String>) {
    let (scheme, rest) = h.split_once(' ').unwrap_or((h, ""));
    let mut params = HashMap::new();
    let mut rest = rest.trim();
    while let Some((k, v)) = rest.split_once('=') {
        let k = k.trim().trim_start_matches(',').trim().to_ascii_lowercase();
        let v = v.trim_start();
        let (val, tail) = if let Some(q) = v.strip_prefix('"') {
            let end = q.find('"').unwrap_or(q.len());
            (q[..end].to_string(), q.get(end + 1..).unwrap_or(""))
        } else {
            let end = v.find(',').unwrap_or(v.len());
            (v[..end].to_string(), &v[end..])
        };
        params.insert(k, val);
        rest = tail.trim_start_matches(',').trim();
    }
    (scheme.to_ascii_lowercase(), params)
}

impl Client {
    pub fn new() -> Client {
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(15))
            .timeout_read(Duration::from_secs(60))
            .build();
        Client { agent, insecure: false, credentials: None, tokens: Mutex::new(HashMap::new()) }
    }

    fn base(&self, r: &Reference) -> String {
        let host = if r.registry == "docker.io" { "registry-1.docker.io" } else { &r.registry };
        let scheme = if self.insecure || is_loopback(host) { "http" } else { "https" };
        format!("{scheme}://{host}/v2/{}", r.repository)
    }

    fn basic(&self) -> Option<String> {
        self.credentials
            .as_ref()
            .map(|(u, p)| format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))))
    }

    /// Gets a token for the challenge and remembers it for `key`.
    fn authenticate(&self, key: &str, challenge: &str, url: &str) -> Result<()> {
        let (scheme, p) = parse_challenge(challenge);
        let auth = match scheme.as_str() {
            "basic" => self.basic().ok_or_else(|| Error::Registry {
                url: url.into(),
                msg: "the registry wants a user name and password (--user)".into(),
            })?,
            "bearer" => {
                let realm = p
                    .get("realm")
                    .ok_or_else(|| Error::Registry { url: url.into(), msg: "Bearer challenge without realm".into() })?;
                let mut req = self.agent.get(realm);
                for k in ["service", "scope"] {
                    if let Some(v) = p.get(k) {
                        req = req.query(k, v);
                    }
                }
                if let Some(b) = self.basic() {
                    req = req.set("Authorization", &b);
                }
                let resp = req
                    .call()
                    .map_err(|e| Error::Registry { url: realm.clone(), msg: format!("token request failed: {e}") })?;
                let text = resp
                    .into_string()
                    .map_err(|e| Error::Registry { url: realm.clone(), msg: format!("token response: {e}") })?;
                let body: serde_json::Value = serde_json::from_str(&text)
                    .map_err(|e| Error::Registry { url: realm.clone(), msg: format!("token response: {e}") })?;
                let tok =
                    body.get("token").or_else(|| body.get("access_token")).and_then(|t| t.as_str()).ok_or_else(
                        || Error::Registry { url: realm.clone(), msg: "token response has no token".into() },
                    )?;
                format!("Bearer {tok}")
            }
            other => {
                return Err(Error::Registry {
                    url: url.into(),
                    msg: format!("unsupported authentication scheme {other:?}"),
                })
            }
        };
        self.tokens
            .lock()
            .map_err(|_| Error::invalid("registry client", "token cache poisoned"))?
            .insert(key.to_string(), auth);
        Ok(())
    }

    /// Sends a request, answering one authentication challenge. `body` is a file or bytes.
    fn send<'b>(
        &self,
        r: &Reference,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: Option<&mut dyn FnMut() -> Result<Body<'b>>>,
    ) -> Result<ureq::Response> {
        let key = format!("{}/{}", r.registry, r.repository);
        let mut body = body;
        for attempt in 0..2 {
            let mut req = self.agent.request(method, url);
            for (k, v) in headers {
                req = req.set(k, v);
            }
            if let Some(a) = self.tokens.lock().ok().and_then(|t| t.get(&key).cloned()) {
                req = req.set("Authorization", &a);
            }
            let res = match body.as_mut() {
                None => req.call(),
                Some(make) => match make()? {
                    Body::Bytes(b) => req.send_bytes(&b),
                    Body::File(f, len) => req.set("Content-Length", &len.to_string()).send(f),
                },
            };
            match res {
                Ok(resp) => return Ok(resp),
                Err(ureq::Error::Status(401, resp)) if attempt == 0 => {
                    let ch = resp.header("WWW-Authenticate").unwrap_or("").to_string();
                    self.authenticate(&key, &ch, url)?;
                }
                Err(ureq::Error::Status(code, resp)) => {
                    let text = resp.into_string().unwrap_or_default();
                    return Err(Error::Registry {
                        url: url.into(),
                        msg: format!(
                            "{method} failed with HTTP {code}: {}",
                            text.trim().chars().take(300).collect::<String>()
                        ),
                    });
                }
                Err(e) => return Err(Error::Registry { url: url.into(), msg: format!("{method} failed: {e}") }),
            }
        }
        Err(Error::Registry { url: url.into(), msg: "authentication was refused".into() })
    }

    /// Fetches a manifest (or index) by tag or digest; returns its bytes, media type and digest.
    fn get_manifest(&self, r: &Reference, reference: &str) -> Result<(Vec<u8>, String, Digest)> {
        let url = format!("{}/manifests/{reference}", self.base(r));
        let accept = [
            MediaType::ImageManifest.to_string(),
            MediaType::ImageIndex.to_string(),
            DOCKER_MANIFEST.into(),
            DOCKER_LIST.into(),
        ]
        .join(", ");
        let resp = self.send(r, "GET", &url, &[("Accept", &accept)], None)?;
        let ct = resp.header("Content-Type").unwrap_or("").to_string();
        let announced = resp.header("Docker-Content-Digest").map(str::to_string);
        let mut bytes = Vec::new();
        resp.into_reader()
            .take(MAX_JSON + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| Error::Registry { url: url.clone(), msg: e.to_string() })?;
        if bytes.len() as u64 > MAX_JSON {
            return Err(Error::Registry { url, msg: "manifest larger than 8 MiB".into() });
        }
        let actual = digest::of_bytes(&bytes);
        if let Ok(d) = digest::parse(reference, "reference") {
            digest::verify(&format!("manifest {url}"), &d, &actual)?;
        } else if let Some(a) = announced {
            digest::verify(&format!("manifest {url} (Docker-Content-Digest)"), &digest::parse(&a, &url)?, &actual)?;
        }
        let v: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| Error::Registry { url: url.clone(), msg: format!("manifest is not JSON: {e}") })?;
        let mt = v.get("mediaType").and_then(|m| m.as_str()).map(str::to_string).unwrap_or(ct);
        if v.get("schemaVersion").and_then(|s| s.as_u64()) != Some(2) {
            return Err(Error::Registry { url, msg: "only schemaVersion 2 manifests are supported".into() });
        }
        Ok((bytes, mt, actual))
    }

    /// Downloads a blob into the store, resuming a partial download, and checks its digest.
    fn fetch_blob(&self, store: &Store, r: &Reference, d: &Digest, size: u64) -> Result<()> {
        if store.has_blob(d) {
            return Ok(());
        }
        let partial = store.root().join("tmp").join(format!("pull-{}.partial", digest::sha256_hex(d)?));
        let mut f =
            OpenOptions::new().create(true).truncate(false).read(true).write(true).open(&partial).at(&partial)?;
        let mut have = f.metadata().at(&partial)?.len();
        if have > size {
            f.set_len(0).at(&partial)?;
            have = 0;
        }
        let mut h = Sha256::new();
        if have > 0 {
            io::copy(&mut (&mut f).take(have), &mut HashWrite(&mut h)).at(&partial)?;
        }
        let url = format!("{}/blobs/{d}", self.base(r));
        let range = format!("bytes={have}-");
        let headers: Vec<(&str, &str)> = if have > 0 && have < size { vec![("Range", &range)] } else { vec![] };
        if have < size {
            let resp = self.send(r, "GET", &url, &headers, None)?;
            if resp.status() != 206 && have > 0 {
                // The registry ignored the range: start over.
                f.set_len(0).at(&partial)?;
                f.rewind().at(&partial)?;
                h = Sha256::new();
                have = 0;
            }
            f.seek(io::SeekFrom::Start(have)).at(&partial)?;
            store.progress().start(&format!("pull {}", crate::store::short(d)), Some(size));
            store.progress().advance(have);
            let mut body = ProgressReader { inner: resp.into_reader().take(size - have), progress: store.progress() };
            let mut buf = vec![0u8; 1 << 16];
            let res: io::Result<()> = (|| loop {
                let n = body.read(&mut buf)?;
                if n == 0 {
                    return Ok(());
                }
                f.write_all(&buf[..n])?;
                h.update(&buf[..n]);
            })();
            store.progress().finish();
            res.map_err(|e| Error::Registry {
                url: url.clone(),
                msg: format!("download interrupted ({e}); run the pull again to resume"),
            })?;
        }
        f.sync_all().at(&partial)?;
        let got = f.metadata().at(&partial)?.len();
        let staged = Staged::at(partial.clone());
        if got != size {
            return Err(Error::Registry { url, msg: format!("blob is {got} bytes, the manifest says {size}") });
        }
        digest::verify(&format!("blob {url}"), d, &digest::finish(h))?;
        store.commit_blob(staged, d)?;
        Ok(())
    }

    /// Pulls `reference` into the store and names it (by default [`Reference::local_name`]).
    pub fn pull(&self, store: &Store, reference: &str, name: Option<&str>) -> Result<Digest> {
        let r = Reference::parse(reference)?;
        let _w = store.writer_lock()?;
        let (mut bytes, mut mt, mut d) = self.get_manifest(&r, &r.reference())?;
        if mt == MediaType::ImageIndex.to_string() || mt == DOCKER_LIST {
            let idx: ImageIndex =
                serde_json::from_slice(&bytes).map_err(|e| Error::invalid(format!("index {d}"), e.to_string()))?;
            let pick = idx.manifests().iter().find(|m| is_linux_amd64(m)).ok_or_else(|| Error::Registry {
                url: self.base(&r),
                msg: format!("{reference} has no linux/amd64 image"),
            })?;
            let want = pick.digest().clone();
            (bytes, mt, d) = self.get_manifest(&r, want.as_ref())?;
        }
        if mt != MediaType::ImageManifest.to_string() && mt != DOCKER_MANIFEST {
            return Err(Error::Registry { url: self.base(&r), msg: format!("unsupported manifest type {mt:?}") });
        }
        let manifest: ImageManifest =
            serde_json::from_slice(&bytes).map_err(|e| Error::invalid(format!("manifest {d}"), e.to_string()))?;
        let cfg = manifest.config();
        self.fetch_blob(store, &r, cfg.digest(), cfg.size())?;
        for l in manifest.layers() {
            self.fetch_blob(store, &r, l.digest(), l.size())?;
        }
        store.put_blob_bytes(&bytes)?;
        let img = store.load_image(&d, vec![])?;
        for l in store.layers_of(&img)? {
            store.ensure_unpacked(&l)?;
        }
        let local = match name {
            Some(n) => normalize_name(n)?,
            None => r.local_name(),
        };
        let mut desc = oci_spec::image::Descriptor::new(MediaType::from(mt.as_str()), bytes.len() as u64, d.clone());
        desc.set_media_type(MediaType::from(mt.as_str()));
        store.tag(Some(&local), &desc)?;
        Ok(d)
    }

    /// Pushes the local image `image` to `reference`. Returns the manifest digest.
    pub fn push(&self, store: &Store, image: &str, reference: &str) -> Result<Digest> {
        let r = Reference::parse(reference)?;
        let _w = store.writer_lock()?;
        let img = store.resolve(image)?;
        let mut blobs: Vec<(Digest, u64)> =
            vec![(img.manifest.config().digest().clone(), img.manifest.config().size())];
        blobs.extend(store.layers_of(&img)?.into_iter().map(|l: LayerDesc| (l.digest, l.size)));
        let base = self.base(&r);
        for (d, size) in &blobs {
            let head = self.send(&r, "HEAD", &format!("{base}/blobs/{d}"), &[], None);
            if head.is_ok() {
                continue;
            }
            let start =
                self.send(&r, "POST", &format!("{base}/blobs/uploads/"), &[], Some(&mut || Ok(Body::Bytes(vec![]))))?;
            let loc = start
                .header("Location")
                .ok_or_else(|| Error::Registry { url: base.clone(), msg: "upload start without Location".into() })?;
            let loc = if loc.starts_with('/') {
                let origin: String = base.splitn(4, '/').take(3).collect::<Vec<_>>().join("/");
                format!("{origin}{loc}")
            } else {
                loc.to_string()
            };
            let sep = if loc.contains('?') { '&' } else { '?' };
            let url = format!("{loc}{sep}digest={d}");
            let path = store.blob_path(d)?;
            store.progress().start(&format!("push {}", crate::store::short(d)), Some(*size));
            let res = self.send(
                &r,
                "PUT",
                &url,
                &[("Content-Type", "application/octet-stream")],
                Some(&mut || {
                    let f = File::open(&path).at(&path)?;
                    Ok(Body::File(Box::new(ProgressReader { inner: f, progress: store.progress() }), *size))
                }),
            );
            store.progress().finish();
            res?;
        }
        let bytes = store.read_blob(&img.digest)?;
        let mt = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v.get("mediaType").and_then(|m| m.as_str()).map(str::to_string))
            .unwrap_or_else(|| MediaType::ImageManifest.to_string());
        let url = format!("{base}/manifests/{}", r.reference());
        let resp =
            self.send(&r, "PUT", &url, &[("Content-Type", &mt)], Some(&mut || Ok(Body::Bytes(bytes.clone()))))?;
        if let Some(a) = resp.header("Docker-Content-Digest") {
            digest::verify(&format!("pushed manifest {url}"), &img.digest, &digest::parse(a, &url)?)?;
        }
        Ok(img.digest)
    }
}

/// A request body.
enum Body<'a> {
    Bytes(Vec<u8>),
    File(Box<dyn Read + 'a>, u64),
}

struct HashWrite<'a>(&'a mut Sha256);

impl Write for HashWrite<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_parse() {
        let r = Reference::parse("busybox").expect("parse");
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str(), r.tag.as_str()),
            ("docker.io", "library/busybox", "latest")
        );
        assert_eq!(r.local_name(), "busybox:latest");
        let r = Reference::parse("127.0.0.1:5000/team/app:1").expect("parse");
        assert_eq!((r.registry.as_str(), r.repository.as_str(), r.tag.as_str()), ("127.0.0.1:5000", "team/app", "1"));
        assert_eq!(r.local_name(), "127.0.0.1:5000/team/app:1");
        assert!(Reference::parse("Bad Name").is_err());
        assert!(Reference::parse("x@sha256:zz").is_err());
    }

    #[test]
    fn challenges_parse() {
        let (s, p) = parse_challenge(
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push""#,
        );
        assert_eq!(s, "bearer");
        assert_eq!(p.get("realm").map(String::as_str), Some("https://auth.example/token"));
        assert_eq!(p.get("service").map(String::as_str), Some("registry.example"));
        assert_eq!(p.get("scope").map(String::as_str), Some("repository:a/b:pull,push"));
        let (s, p) = parse_challenge(r#"Basic realm="basic-realm""#);
        assert_eq!((s.as_str(), p.get("realm").map(String::as_str)), ("basic", Some("basic-realm")));
    }
}
