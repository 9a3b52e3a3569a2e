//! `isla build`: the common subset of Containerfile/Dockerfile.
//!
//! Supported: one `FROM image|scratch`, `COPY`/`ADD` of local files and directories (`ADD` of
//! URLs and auto-extraction of archives are not supported and say so), `RUN` (shell and JSON
//! forms, run by a [`RunStep`]), `ENV`, `WORKDIR`, `USER`, `EXPOSE`, `ENTRYPOINT`, `CMD`,
//! `LABEL`, `ARG NAME[=default]` (the value given to [`Builder::build_with_args`], else the
//! default, is in the environment of later RUN steps, under ENV of the same name, and is not
//! kept in the image; `$NAME` in other instructions is not substituted). Lines continue with
//! `\`, `#` starts a comment.
//!
//! Every step that makes a layer (RUN, COPY, ADD) runs in an overlay over the layers so far, and
//! the overlay's upper directory becomes the layer (whiteouts converted to OCI form). Each such
//! step is cached under a key that hashes the key of the step before it (so the base image, all
//! earlier instructions and the configuration they built are covered), the instruction text and,
//! for COPY and ADD, the names, modes, owners and contents of the copied files.

use std::fs;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use oci_spec::image::{Config, ImageConfiguration};
use rustix::fs::{Mode, OFlags};
use sha2::{Digest as _, Sha256};

use crate::digest;
use crate::error::{Error, IoContext, Result};
use crate::layer::{self, WriteOptions};
use crate::rootfs::RootfsMount;
use crate::run::{context_path, mkdir_in_root, RunStep};
use crate::store::{LayerDesc, Store};

/// One parsed instruction.
#[derive(Debug, Clone, PartialEq)]
pub struct Instruction {
    /// 1-based line where it starts.
    pub line: usize,
    /// Upper-case keyword.
    pub keyword: String,
    /// Everything after the keyword, continuation lines joined.
    pub args: String,
}

/// Parses a Containerfile into instructions.
pub fn parse(text: &str, file: &str) -> Result<Vec<Instruction>> {
    let mut out = Vec::new();
    let mut pending: Option<(usize, String)> = None;
    for (i, raw) in text.lines().enumerate() {
        let trimmed = raw.trim();
        if pending.is_none() && (trimmed.is_empty() || trimmed.starts_with('#')) {
            continue;
        }
        if pending.is_some() && trimmed.starts_with('#') {
            continue;
        }
        let (start, mut acc) = pending.take().unwrap_or((i + 1, String::new()));
        if let Some(body) = trimmed.strip_suffix('\\') {
            acc.push_str(body);
            acc.push(' ');
            pending = Some((start, acc));
            continue;
        }
        acc.push_str(trimmed);
        let (kw, args) = acc.split_once(char::is_whitespace).unwrap_or((&acc, ""));
        out.push(Instruction { line: start, keyword: kw.to_ascii_uppercase(), args: args.trim().to_string() });
    }
    if let Some((line, _)) = pending {
        return Err(Error::Build { file: file.into(), line, msg: "the file ends inside a `\\` continuation".into() });
    }
    if out.is_empty() {
        return Err(Error::Build { file: file.into(), line: 1, msg: "no instructions; start with FROM".into() });
    }
    Ok(out)
}

/// `["a", "b"]` (JSON form) or `None` for shell form.
fn json_form(args: &str) -> Option<Vec<String>> {
    if args.starts_with('[') {
        serde_json::from_str(args).ok()
    } else {
        None
    }
}

/// Shell form becomes `/bin/sh -c "..."`.
fn command(args: &str) -> Vec<String> {
    json_form(args).unwrap_or_else(|| vec!["/bin/sh".into(), "-c".into(), args.into()])
}

/// `k=v k2="v 2"` or legacy `k v` (ENV, LABEL).
fn pairs(args: &str, legacy: bool) -> std::result::Result<Vec<(String, String)>, String> {
    let words = split_words(args)?;
    if legacy && !words.first().is_some_and(|w| w.contains('=')) {
        let (k, v) = args.split_once(char::is_whitespace).ok_or("expected KEY=VALUE or KEY VALUE")?;
        return Ok(vec![(k.to_string(), v.trim().to_string())]);
    }
    words
        .into_iter()
        .map(|w| {
            w.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())).ok_or(format!("{w:?} is not KEY=VALUE"))
        })
        .collect()
}

/// Splits on whitespace, honouring double and single quotes and backslash escapes.
fn split_words(s: &str) -> std::result::Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quote: Option<char> = None;
    let mut any = false;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (None, '"' | '\'') => {
                quote = Some(c);
                any = true;
            }
            (Some(q), c) if c == q => quote = None,
            (q, '\\') if q != Some('\'') => cur.extend(chars.next()),
            (None, c) if c.is_whitespace() => {
                if any || !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
                any = false;
            }
            (_, c) => cur.push(c),
        }
    }
    if quote.is_some() {
        return Err("unterminated quote".into());
    }
    if any || !cur.is_empty() {
        out.push(cur);
    }
    Ok(out)
}

/// COPY/ADD arguments: (as written, resolved in the context) sources, destination, --chown.
type CopyArgs = (Vec<(String, PathBuf)>, String, Option<(u32, u32)>);

/// What a build produced.
#[derive(Debug, Clone)]
pub struct BuildReport {
    pub digest: oci_spec::image::Digest,
    /// Layer steps taken from the cache / executed.
    pub cached: usize,
    pub executed: usize,
}

/// A build: the store, the context directory and how RUN steps are executed.
pub struct Builder<'a> {
    pub store: &'a Store,
    pub context: PathBuf,
    pub file: String,
    pub runner: &'a dyn RunStep,
    /// Print each step to standard error.
    pub verbose: bool,
}

struct State {
    layers: Vec<LayerDesc>,
    config: ImageConfiguration,
    key: String,
    /// Build arguments declared with ARG so far: `NAME=value` for the RUN environment.
    args: Vec<String>,
}

fn hash_parts(parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    digest::hex(&h.finalize())
}

/// Hashes names, modes, owners, link targets and contents of `path` (a file or a tree).
fn hash_source(path: &Path, h: &mut Sha256) -> Result<()> {
    let md = fs::symlink_metadata(path).at(path)?;
    h.update(format!("{:o} {} {} {}\n", md.mode(), md.uid(), md.gid(), md.len()).as_bytes());
    if md.is_dir() {
        let mut names: Vec<_> = fs::read_dir(path).at(path)?.flatten().map(|e| e.file_name()).collect();
        names.sort();
        for n in names {
            h.update(n.as_encoded_bytes());
            h.update(b"/");
            hash_source(&path.join(&n), h)?;
        }
    } else if md.file_type().is_symlink() {
        h.update(fs::read_link(path).at(path)?.as_os_str().as_encoded_bytes());
    } else if md.is_file() {
        let mut f = fs::File::open(path).at(path)?;
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = f.read(&mut buf).at(path)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
    }
    Ok(())
}

/// Layers referenced by the build cache (GC keeps them).
pub(crate) fn cached_layers(store: &Store) -> Result<Vec<LayerDesc>> {
    let dir = store.root().join("cache/build");
    let mut out = Vec::new();
    for e in fs::read_dir(&dir).at(&dir)?.flatten() {
        if let Ok(bytes) = crate::store::read_limited(&e.path(), 1 << 16) {
            if let Ok(l) = serde_json::from_slice::<LayerDesc>(&bytes) {
                out.push(l);
            }
        }
    }
    Ok(out)
}

impl Builder<'_> {
    fn err(&self, line: usize, msg: impl Into<String>) -> Error {
        Error::Build { file: self.file.clone(), line, msg: msg.into() }
    }

    /// Runs the Containerfile `text` and names the result `tag`.
    pub fn build(&self, text: &str, tag: Option<&str>) -> Result<BuildReport> {
        self.build_with_args(text, tag, &std::collections::BTreeMap::new())
    }

    /// [`Builder::build`] with values for the file's `ARG`s (`--build-arg NAME=VALUE`).
    pub fn build_with_args(
        &self,
        text: &str,
        tag: Option<&str>,
        build_args: &std::collections::BTreeMap<String, String>,
    ) -> Result<BuildReport> {
        let _w = self.store.writer_lock()?;
        let instrs = parse(text, &self.file)?;
        let first = &instrs[0];
        if first.keyword != "FROM" {
            return Err(self.err(first.line, format!("the first instruction must be FROM, not {}", first.keyword)));
        }
        let mut state = self.from(first)?;
        let (mut cached, mut executed) = (0, 0);
        let total = instrs.len();
        for (n, ins) in instrs.iter().enumerate().skip(1) {
            if self.verbose {
                eprintln!("STEP {}/{}: {} {}", n + 1, total, ins.keyword, ins.args);
            }
            let made = self.step(&mut state, ins, build_args)?;
            match made {
                Some(true) => cached += 1,
                Some(false) => executed += 1,
                None => {}
            }
        }
        if self.verbose {
            let declared = |k: &str| {
                instrs.iter().any(|i| i.keyword == "ARG" && i.args.split('=').next().map(str::trim) == Some(k))
            };
            let unused: Vec<&str> = build_args.keys().map(String::as_str).filter(|k| !declared(k)).collect();
            if !unused.is_empty() {
                eprintln!("warning: build arguments without an ARG in {}: {}", self.file, unused.join(", "));
            }
        }
        let mut config = state.config.clone();
        config.rootfs_mut().set_diff_ids(state.layers.iter().map(|l| l.diff_id.to_string()).collect());
        let digest = self.store.commit_image(&config, &state.layers, tag)?;
        Ok(BuildReport { digest, cached, executed })
    }

    fn from(&self, ins: &Instruction) -> Result<State> {
        let mut words = ins.args.split_whitespace();
        let base = words.next().ok_or_else(|| self.err(ins.line, "FROM needs an image name or `scratch`"))?;
        if words.next().is_some_and(|w| !w.eq_ignore_ascii_case("as")) {
            return Err(self.err(ins.line, "FROM takes one image (and optionally `AS name`)"));
        }
        if base == "scratch" {
            let config: ImageConfiguration = serde_json::from_value(serde_json::json!({
                "architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}
            }))
            .map_err(|e| self.err(ins.line, e.to_string()))?;
            return Ok(State { layers: vec![], config, key: hash_parts(&[b"scratch"]), args: vec![] });
        }
        let img = crate::busybox::resolve_or_make(self.store, base).map_err(|e| self.err(ins.line, e.to_string()))?;
        let layers = self.store.layers_of(&img)?;
        Ok(State {
            layers,
            config: img.config.clone(),
            key: hash_parts(&[b"from", img.digest.to_string().as_bytes()]),
            args: vec![],
        })
    }

    /// Applies one instruction. Returns Some(cached?) for layer steps, None for metadata.
    fn step(
        &self,
        st: &mut State,
        ins: &Instruction,
        build_args: &std::collections::BTreeMap<String, String>,
    ) -> Result<Option<bool>> {
        let line = ins.line;
        let args = ins.args.as_str();
        let mut extra = Vec::new();
        let result = match ins.keyword.as_str() {
            "FROM" => return Err(self.err(line, "only one FROM is supported (no multi-stage builds yet)")),
            "ENV" => {
                let kvs = pairs(args, true).map_err(|e| self.err(line, format!("ENV: {e}")))?;
                edit(st, |c| {
                    let mut env = c.env().clone().unwrap_or_default();
                    for (k, v) in &kvs {
                        env.retain(|e| e.split_once('=').map(|(ek, _)| ek) != Some(k.as_str()));
                        env.push(format!("{k}={v}"));
                    }
                    c.set_env(Some(env));
                });
                None
            }
            "LABEL" => {
                let kvs = pairs(args, false).map_err(|e| self.err(line, format!("LABEL: {e}")))?;
                edit(st, |c| {
                    let mut labels = c.labels().clone().unwrap_or_default();
                    labels.extend(kvs.iter().cloned());
                    c.set_labels(Some(labels));
                });
                None
            }
            "WORKDIR" => {
                if args.is_empty() {
                    return Err(self.err(line, "WORKDIR needs a path"));
                }
                let cur = st.config.config().as_ref().and_then(|c| c.working_dir().clone()).unwrap_or_else(|| "/".into());
                let dir = if args.starts_with('/') { args.to_string() } else { format!("{}/{args}", cur.trim_end_matches('/')) };
                edit(st, |c| {
                    c.set_working_dir(Some(dir));
                });
                None
            }
            "USER" => {
                edit(st, |c| {
                    c.set_user(Some(args.to_string()));
                });
                None
            }
            "EXPOSE" => {
                let ports: Vec<String> = args.split_whitespace().map(|p| if p.contains('/') { p.to_string() } else { format!("{p}/tcp") }).collect();
                for p in &ports {
                    let (num, proto) = p.split_once('/').unwrap_or((p, "tcp"));
                    if num.parse::<u16>().is_err() || !["tcp", "udp", "sctp"].contains(&proto) {
                        return Err(self.err(line, format!("EXPOSE: {p:?} is not PORT[/tcp|udp|sctp]")));
                    }
                }
                edit(st, |c| {
                    let mut all = c.exposed_ports().clone().unwrap_or_default();
                    all.extend(ports);
                    all.sort();
                    all.dedup();
                    c.set_exposed_ports(Some(all));
                });
                None
            }
            "ENTRYPOINT" => {
                let cmd = command(args);
                edit(st, |c| {
                    c.set_entrypoint(Some(cmd));
                });
                None
            }
            "CMD" => {
                let cmd = command(args);
                edit(st, |c| {
                    c.set_cmd(Some(cmd));
                });
                None
            }
            "ARG" => {
                let (name, default) = args.split_once('=').map_or((args, None), |(n, d)| (n, Some(d)));
                let name = name.trim();
                if name.is_empty() || name.contains(char::is_whitespace) {
                    return Err(self.err(line, "ARG takes one NAME or NAME=default"));
                }
                let default = default.map(|d| split_words(d).map(|w| w.join(" "))).transpose();
                let default = default.map_err(|e| self.err(line, format!("ARG: {e}")))?;
                if let Some(v) = build_args.get(name).cloned().or(default) {
                    // The value is part of the cache key of every later step.
                    extra = v.clone().into_bytes();
                    st.args.retain(|a| a.split_once('=').map(|(k, _)| k) != Some(name));
                    st.args.push(format!("{name}={v}"));
                }
                None
            }
            "RUN" => {
                let run_args = st.args.clone();
                Some(self.layer_step(st, ins, &extra, |m, config| {
                    let mut config = config.clone();
                    let mut env = config.env().clone().unwrap_or_default();
                    let set = |a: &String| env.iter().any(|e| e.split_once('=').map(|(k, _)| k) == a.split_once('=').map(|(k, _)| k));
                    let from_args: Vec<String> = run_args.iter().filter(|a| !set(a)).cloned().collect();
                    env.extend(from_args);
                    config.set_env(Some(env));
                    self.runner.run(&m.merged, &config, &command(args))
                })?)
            }
            "COPY" | "ADD" => {
                let (srcs, dest, chown) = self.copy_args(ins)?;
                let mut h = Sha256::new();
                for (rel, abs) in &srcs {
                    h.update(rel.as_bytes());
                    hash_source(abs, &mut h)?;
                }
                extra = h.finalize().to_vec();
                let workdir = st.config.config().as_ref().and_then(|c| c.working_dir().clone()).unwrap_or_else(|| "/".into());
                Some(self.layer_step(st, ins, &extra, |m, _| copy_into(&m.merged, &srcs, &dest, &workdir, chown).map_err(|e| self.err(line, e.to_string())))?)
            }
            other => return Err(self.err(line, format!("{other} is not supported (supported: FROM RUN COPY ADD ENV ARG WORKDIR USER EXPOSE ENTRYPOINT CMD LABEL)"))),
        };
        let cfg_json = serde_json::to_vec(st.config.config()).unwrap_or_default();
        st.key = hash_parts(&[st.key.as_bytes(), ins.keyword.as_bytes(), ins.args.as_bytes(), &extra, &cfg_json]);
        Ok(result)
    }

    fn copy_args(&self, ins: &Instruction) -> Result<CopyArgs> {
        let mut words = json_form(&ins.args)
            .map(Ok)
            .unwrap_or_else(|| split_words(&ins.args))
            .map_err(|e| self.err(ins.line, e))?;
        let mut chown = None;
        while words.first().is_some_and(|w| w.starts_with("--")) {
            let flag = words.remove(0);
            match flag.strip_prefix("--chown=") {
                Some(spec) => {
                    let (u, g) = spec.split_once(':').unwrap_or((spec, spec));
                    match (u.parse(), g.parse()) {
                        (Ok(u), Ok(g)) => chown = Some((u, g)),
                        _ => {
                            return Err(self.err(ins.line, format!("{flag}: only numeric --chown=UID:GID is supported")))
                        }
                    }
                }
                None => return Err(self.err(ins.line, format!("{} option {flag} is not supported", ins.keyword))),
            }
        }
        if words.len() < 2 {
            return Err(self.err(ins.line, format!("{} needs at least one source and a destination", ins.keyword)));
        }
        let dest = words.pop().unwrap_or_default();
        let mut srcs = Vec::new();
        for w in words {
            if w.contains("://") {
                return Err(self.err(
                    ins.line,
                    format!("{} of URLs ({w}) is not supported; download the file into the context", ins.keyword),
                ));
            }
            if w.contains(['*', '?', '[']) {
                return Err(self.err(ins.line, format!("wildcards ({w}) are not supported; name the files")));
            }
            let abs = context_path(&self.context, &w).map_err(|e| self.err(ins.line, e.to_string()))?;
            srcs.push((w, abs));
        }
        Ok((srcs, dest, chown))
    }

    /// Runs a layer-making step in an overlay, or takes it from the cache. Returns whether it
    /// was cached.
    fn layer_step(
        &self,
        st: &mut State,
        ins: &Instruction,
        extra: &[u8],
        work: impl FnOnce(&RootfsMount, &Config) -> Result<()>,
    ) -> Result<bool> {
        let cfg_json = serde_json::to_vec(st.config.config()).unwrap_or_default();
        let key = hash_parts(&[st.key.as_bytes(), ins.keyword.as_bytes(), ins.args.as_bytes(), extra, &cfg_json]);
        let entry = self.store.root().join("cache/build").join(format!("{key}.json"));
        if let Ok(bytes) = crate::store::read_limited(&entry, 1 << 16) {
            if let Ok(l) = serde_json::from_slice::<LayerDesc>(&bytes) {
                if self.store.has_blob(&l.digest) && self.store.ensure_unpacked(&l).is_ok() {
                    push_layer(st, l, ins);
                    return Ok(true);
                }
            }
        }
        let tmp = self.store.staged("build");
        let mut lower: Vec<PathBuf> = st.layers.iter().map(|l| self.store.ensure_unpacked(l)).collect::<Result<_>>()?;
        if lower.is_empty() {
            let empty = tmp.path.join("empty");
            fs::create_dir_all(&empty).at(&empty)?;
            lower.push(empty);
        }
        lower.reverse();
        let m = RootfsMount::new("build", lower, &tmp.path);
        m.mount()?;
        let config = st.config.config().clone().unwrap_or_default();
        let res = work(&m, &config);
        let un = m.unmount();
        res?;
        un?;
        let upper = m.upper.clone();
        let l = self.store.add_layer(|w| layer::write_dir(&upper, w, WriteOptions { overlay: true, mtime: None }))?;
        let json = serde_json::to_vec(&l).map_err(|e| self.err(ins.line, e.to_string()))?;
        self.store.write_atomic(&entry, &json)?;
        drop(tmp);
        push_layer(st, l, ins);
        Ok(false)
    }
}

fn push_layer(st: &mut State, l: LayerDesc, ins: &Instruction) {
    st.config.rootfs_mut().diff_ids_mut().push(l.diff_id.to_string());
    let h: oci_spec::image::History =
        serde_json::from_value(serde_json::json!({"created_by": format!("{} {}", ins.keyword, ins.args)}))
            .unwrap_or_default();
    let mut hist = st.config.history().clone().unwrap_or_default();
    hist.push(h);
    st.config.set_history(Some(hist));
    st.layers.push(l);
}

/// Changes the runtime configuration (creating it if absent).
fn edit(st: &mut State, f: impl FnOnce(&mut Config)) {
    let mut c = st.config.config().clone().unwrap_or_default();
    f(&mut c);
    st.config.set_config(Some(c));
}

/// Copies sources into the mounted root filesystem at `dest` (relative to `workdir`), resolving
/// paths inside the root so that symbolic links in the image cannot lead outside it.
fn copy_into(
    merged: &Path,
    srcs: &[(String, PathBuf)],
    dest: &str,
    workdir: &str,
    chown: Option<(u32, u32)>,
) -> Result<()> {
    let root =
        rustix::fs::open(merged, OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty()).at(merged)?;
    let dest_abs =
        if dest.starts_with('/') { dest.to_string() } else { format!("{}/{dest}", workdir.trim_end_matches('/')) };
    let into_dir = dest.ends_with('/') || srcs.len() > 1 || srcs.iter().any(|(_, p)| p.is_dir()) || {
        crate::run::open_in_root(&root, &dest_abs, OFlags::PATH | OFlags::DIRECTORY).is_ok()
    };
    let (dir_path, file_name) = if into_dir {
        (dest_abs.clone(), None)
    } else {
        let (d, f) = dest_abs.rsplit_once('/').unwrap_or(("/", &dest_abs));
        (if d.is_empty() { "/".to_string() } else { d.to_string() }, Some(f.to_string()))
    };
    let dir = mkdir_in_root(&root, &dir_path).at(Path::new(&dir_path))?;
    for (_, src) in srcs {
        if src.is_dir() {
            copy_tree(src, &dir, chown)?;
        } else {
            let name = match &file_name {
                Some(n) => n.clone(),
                None => src.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
            };
            copy_entry(src, &dir, &name, chown)?;
        }
    }
    Ok(())
}

fn copy_tree(src: &Path, dir: &impl std::os::fd::AsFd, chown: Option<(u32, u32)>) -> Result<()> {
    let mut names: Vec<_> = fs::read_dir(src).at(src)?.flatten().map(|e| e.file_name()).collect();
    names.sort();
    for n in names {
        copy_entry(&src.join(&n), dir, &n.to_string_lossy(), chown)?;
    }
    Ok(())
}

/// Copies one file, link or directory tree to `name` in `dir` (owned by root unless `chown`).
fn copy_entry(src: &Path, dir: &impl std::os::fd::AsFd, name: &str, chown: Option<(u32, u32)>) -> Result<()> {
    let md = fs::symlink_metadata(src).at(src)?;
    let at = Path::new(name);
    match rustix::fs::statat(dir, name, rustix::fs::AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) if rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Directory && md.is_dir() => {
        }
        Ok(st) => {
            let flags = if rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Directory {
                rustix::fs::AtFlags::REMOVEDIR
            } else {
                rustix::fs::AtFlags::empty()
            };
            rustix::fs::unlinkat(dir, name, flags).at(at)?;
        }
        Err(_) => {}
    }
    if md.is_dir() {
        match rustix::fs::mkdirat(dir, name, Mode::from_bits_truncate(md.permissions().mode())) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(e) => return Err(e).at(at),
        }
        let sub = rustix::fs::openat(
            dir,
            name,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .at(at)?;
        copy_tree(src, &sub, chown)?;
    } else if md.file_type().is_symlink() {
        let target = fs::read_link(src).at(src)?;
        rustix::fs::symlinkat(&target, dir, name).at(at)?;
    } else if md.is_file() {
        let fd = rustix::fs::openat(
            dir,
            name,
            OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_bits_truncate(0o600),
        )
        .at(at)?;
        let mut out = fs::File::from(fd);
        std::io::copy(&mut fs::File::open(src).at(src)?, &mut out).at(at)?;
    } else {
        return Err(Error::invalid(
            src.display().to_string(),
            "only files, directories and symbolic links can be copied",
        ));
    }
    let (uid, gid) = chown.unwrap_or((0, 0));
    rustix::fs::chownat(
        dir,
        name,
        Some(rustix::fs::Uid::from_raw(uid)),
        Some(rustix::fs::Gid::from_raw(gid)),
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )
    .at(at)?;
    if !md.file_type().is_symlink() {
        rustix::fs::chmodat(
            dir,
            name,
            Mode::from_bits_truncate(md.permissions().mode() & 0o7777),
            rustix::fs::AtFlags::empty(),
        )
        .at(at)?;
    }
    Ok(())
}
