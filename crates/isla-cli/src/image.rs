//! `isla image ...` and `isla build`: the command line of the image store (crate isla-image).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use isla_image::archive::{self, Format};
use isla_image::build::Builder;
use isla_image::registry::Client;
use isla_image::{busybox, Progress, Store};

#[derive(Args)]
pub struct StoreArg {
    /// Image store directory (default: $ISLA_IMAGE_ROOT, else /var/lib/isla/images).
    #[arg(long, global = true)]
    root: Option<PathBuf>,
}

#[derive(Args)]
pub struct ImageArgs {
    #[command(flatten)]
    store: StoreArg,
    #[command(subcommand)]
    cmd: ImageCmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
enum SaveFormat {
    Oci,
    Docker,
}

#[derive(Subcommand)]
enum ImageCmd {
    /// List images.
    Ls {
        #[arg(long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Print an image's manifest and configuration as JSON.
    Inspect { image: String },
    /// Remove image names (or, by digest, the image) and the blobs nothing uses any more.
    Rm {
        #[arg(required = true)]
        images: Vec<String>,
    },
    /// Remove unnamed images and unreferenced blobs and layers (and the build cache).
    Prune {
        #[arg(long)]
        build_cache: bool,
    },
    /// Disk usage of the store.
    Df {
        #[arg(long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Check the store: every named image complete, every blob matching its digest.
    Fsck {
        /// Also remove leftovers of interrupted work and unreferenced content.
        #[arg(long)]
        repair: bool,
        #[arg(long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Import an OCI layout (directory or tarball) or a `docker save` archive.
    Load {
        #[arg(short, long)]
        input: PathBuf,
    },
    /// Export images to a tarball (OCI layout, or `docker load` format).
    Save {
        #[arg(short, long)]
        output: PathBuf,
        #[arg(long, value_enum, default_value = "oci")]
        format: SaveFormat,
        #[arg(required = true)]
        images: Vec<String>,
    },
    /// Pull an image from a registry (linux/amd64).
    Pull {
        reference: String,
        /// Local name (default: the reference).
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        reg: RegistryArgs,
    },
    /// Push an image to a registry.
    Push {
        image: String,
        /// Destination reference (default: the image name).
        reference: Option<String>,
        #[command(flatten)]
        reg: RegistryArgs,
    },
    /// Give an image another name.
    Tag { image: String, name: String },
    /// Make a single-layer image of a root filesystem directory.
    FromRootfs {
        dir: PathBuf,
        #[arg(long)]
        name: String,
        /// Set every time stamp to 0 so the same tree always gives the same digest.
        #[arg(long)]
        reproducible: bool,
    },
    /// Make the busybox image from the host's busybox-static (no network needed).
    Busybox {
        #[arg(long, default_value = busybox::BUSYBOX_NAME)]
        name: String,
    },
    /// Build an image from a Containerfile (same as `isla build`).
    Build(BuildArgs),
    /// Benchmark: import of a generated layer, and root filesystem preparation for a container.
    Bench {
        /// Size of the generated layer in MiB.
        #[arg(long, default_value_t = 100)]
        size_mb: u64,
        /// Rootfs preparations to time.
        #[arg(long, default_value_t = 20)]
        runs: usize,
    },
}

#[derive(Args)]
struct RegistryArgs {
    /// Use plain HTTP (loopback registries always do).
    #[arg(long)]
    insecure: bool,
    /// Credentials as USER:PASSWORD (also from ISLA_REGISTRY_AUTH).
    #[arg(long)]
    user: Option<String>,
}

#[derive(Args)]
pub struct BuildArgs {
    #[command(flatten)]
    store: StoreArg,
    /// The Containerfile (default: CONTEXT/Containerfile, else CONTEXT/Dockerfile).
    #[arg(short, long)]
    file: Option<PathBuf>,
    /// Name of the result.
    #[arg(short, long)]
    tag: Option<String>,
    /// A value for an ARG of the Containerfile: NAME=VALUE (or NAME to pass this shell's value).
    #[arg(long = "build-arg", value_name = "NAME=VALUE")]
    build_args: Vec<String>,
    /// Build context directory.
    context: PathBuf,
}

/// Progress bars on standard error (hidden when it is not a terminal).
struct Bars(Mutex<Option<ProgressBar>>);

impl Progress for Bars {
    fn start(&self, task: &str, total: Option<u64>) {
        let bar = match total {
            Some(t) => ProgressBar::new(t).with_style(
                ProgressStyle::with_template("{msg:24} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
            ),
            None => ProgressBar::new_spinner(),
        };
        bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
        bar.set_message(task.to_string());
        if let Ok(mut b) = self.0.lock() {
            *b = Some(bar);
        }
    }
    fn advance(&self, n: u64) {
        if let Ok(b) = self.0.lock() {
            if let Some(b) = b.as_ref() {
                b.inc(n);
            }
        }
    }
    fn finish(&self) {
        if let Ok(mut b) = self.0.lock() {
            if let Some(b) = b.take() {
                b.finish_and_clear();
            }
        }
    }
}

impl StoreArg {
    fn root(&self) -> PathBuf {
        self.root.clone().unwrap_or_else(Store::default_root)
    }
}

fn open(s: &StoreArg) -> Result<Store> {
    let root = s.root();
    let store =
        Store::open(&root).with_context(|| format!("opening the image store at {} (--root)", root.display()))?;
    Ok(store.with_progress(Arc::new(Bars(Mutex::new(None)))))
}

fn human(n: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < units.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", units[i])
    }
}

fn print_json(v: &impl serde::Serialize) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn client(reg: &RegistryArgs) -> Result<Client> {
    let mut c = Client::new();
    c.insecure = reg.insecure;
    if let Some(u) = reg.user.clone().or_else(|| std::env::var("ISLA_REGISTRY_AUTH").ok()) {
        let (user, pass) = u.split_once(':').context("--user: expected USER:PASSWORD")?;
        c.credentials = Some((user.to_string(), pass.to_string()));
    }
    Ok(c)
}

pub fn run(args: &ImageArgs) -> Result<()> {
    let store = open(&args.store)?;
    match &args.cmd {
        ImageCmd::Ls { output } => {
            let images = store.list()?;
            match output {
                Output::Json => print_json(
                    &images
                        .iter()
                        .map(|i| {
                            serde_json::json!({"names": i.names, "digest": i.digest.to_string(), "size": i.size,
                                "created": i.config.created(), "layers": i.manifest.layers().len()})
                        })
                        .collect::<Vec<_>>(),
                )?,
                Output::Table => {
                    println!("{:<40} {:<14} {:>10} {:>6}  CREATED", "NAME", "DIGEST", "SIZE", "LAYERS");
                    for i in &images {
                        let names = if i.names.is_empty() { vec!["<none>".to_string()] } else { i.names.clone() };
                        for n in names {
                            let created = i.config.created().clone().unwrap_or_default();
                            println!(
                                "{n:<40} {:<14} {:>10} {:>6}  {created}",
                                isla_image::store::short(&i.digest),
                                human(i.size),
                                i.manifest.layers().len()
                            );
                        }
                    }
                }
            }
        }
        ImageCmd::Inspect { image } => {
            let i = store.resolve(image)?;
            print_json(
                &serde_json::json!({"digest": i.digest.to_string(), "names": i.names, "size": i.size, "manifest": i.manifest, "config": i.config}),
            )?;
        }
        ImageCmd::Rm { images } => {
            for i in images {
                let r = store.remove(i)?;
                println!(
                    "removed {i} (freed {}: {} blobs, {} layers)",
                    human(r.bytes_freed),
                    r.blobs_removed,
                    r.layers_removed
                );
            }
        }
        ImageCmd::Prune { build_cache } => {
            let r = store.prune(*build_cache)?;
            println!(
                "freed {}: {} blobs, {} layers, {} staging leftovers",
                human(r.bytes_freed),
                r.blobs_removed,
                r.layers_removed,
                r.staging_removed
            );
        }
        ImageCmd::Df { output } => {
            let du = store.disk_usage()?;
            match output {
                Output::Json => print_json(&du)?,
                Output::Table => {
                    println!("images      {}", du.images);
                    println!("blobs       {}", human(du.blobs));
                    println!("layers      {}", human(du.layers));
                    println!("containers  {}", human(du.containers));
                    println!("staging     {}", human(du.staging));
                }
            }
        }
        ImageCmd::Fsck { repair, output } => {
            let r = store.fsck(*repair)?;
            match output {
                Output::Json => print_json(&r)?,
                Output::Table => {
                    println!("{} images, {} blobs checked", r.images, r.blobs_checked);
                    for e in &r.errors {
                        println!("error: {e}");
                    }
                    for l in &r.leftovers {
                        println!("leftover: {l}{}", if *repair && r.is_consistent() { " (removed)" } else { "" });
                    }
                }
            }
            if !r.is_consistent() {
                bail!("the store at {} is inconsistent ({} errors)", store.root().display(), r.errors.len());
            }
        }
        ImageCmd::Load { input } => {
            for l in archive::load(&store, input).with_context(|| format!("loading {}", input.display()))? {
                let names = if l.names.is_empty() { "<none>".to_string() } else { l.names.join(", ") };
                println!("loaded {names} {}", l.digest);
            }
        }
        ImageCmd::Save { output, format, images } => {
            let f = match format {
                SaveFormat::Oci => Format::Oci,
                SaveFormat::Docker => Format::Docker,
            };
            archive::save(&store, images, output, f)?;
            println!("saved {} to {}", images.join(", "), output.display());
        }
        ImageCmd::Pull { reference, name, reg } => {
            let d = client(reg)?.pull(&store, reference, name.as_deref())?;
            println!("pulled {reference} {d}");
        }
        ImageCmd::Push { image, reference, reg } => {
            let dest = reference.as_deref().unwrap_or(image);
            let d = client(reg)?.push(&store, image, dest)?;
            println!("pushed {dest} {d}");
        }
        ImageCmd::Tag { image, name } => {
            let i = store.resolve(image)?;
            let len = store.read_blob(&i.digest)?.len() as u64;
            let mt = i.manifest.media_type().clone().unwrap_or(oci_spec::image::MediaType::ImageManifest);
            store.tag(Some(name), &oci_spec::image::Descriptor::new(mt, len, i.digest.clone()))?;
        }
        ImageCmd::FromRootfs { dir, name, reproducible } => {
            let d = busybox::from_rootfs(&store, dir, name, *reproducible)?;
            println!("{name} {d}");
        }
        ImageCmd::Busybox { name } => {
            let d = busybox::busybox_image(&store, Some(name))?;
            println!("{name} {d}");
        }
        ImageCmd::Build(b) => build_in(&store, b)?,
        ImageCmd::Bench { size_mb, runs } => bench(&args.store.root(), *size_mb, *runs)?,
    }
    Ok(())
}

/// `isla build`.
pub fn build(args: &BuildArgs) -> Result<()> {
    build_in(&open(&args.store)?, args)
}

fn build_in(store: &Store, args: &BuildArgs) -> Result<()> {
    // `NAME` alone passes this shell's value (left out when unset), as Docker does.
    let build_args = args
        .build_args
        .iter()
        .filter_map(|a| match a.split_once('=') {
            Some((k, v)) => Some((k.to_string(), v.to_string())),
            None => std::env::var(a).ok().map(|v| (a.clone(), v)),
        })
        .collect();
    build_image(store, &args.context, args.file.as_deref(), args.tag.as_deref(), &build_args)?;
    Ok(())
}

/// Builds the Containerfile `file` (default: CONTEXT/Containerfile, else CONTEXT/Dockerfile)
/// in `context` with isla's runtime for RUN steps, names it `tag` and prints a summary line.
/// `isla build` and `isla compose up` (services with `build:`) use it.
pub fn build_image(
    store: &Store,
    context: &Path,
    file: Option<&Path>,
    tag: Option<&str>,
    build_args: &std::collections::BTreeMap<String, String>,
) -> Result<isla_image::build::BuildReport> {
    let file = match file {
        Some(f) => f.to_path_buf(),
        None => ["Containerfile", "Dockerfile"]
            .iter()
            .map(|n| context.join(n))
            .find(|p| p.exists())
            .unwrap_or_else(|| context.join("Containerfile")),
    };
    let text = std::fs::read_to_string(&file).with_context(|| format!("reading {} (-f)", file.display()))?;
    let runner = crate::buildrun::ContainerRunner::new(&store.root().join("build-run"))?;
    let b = Builder {
        store,
        context: context.to_path_buf(),
        file: file.display().to_string(),
        runner: &runner,
        verbose: true,
    };
    let r = b.build_with_args(&text, tag, build_args)?;
    println!("built {} {} ({} steps cached, {} run)", tag.unwrap_or("<none>"), r.digest, r.cached, r.executed);
    Ok(r)
}

/// Writes a `docker save` archive with one layer of `size` bytes of incompressible data.
fn make_archive(path: &Path, size: u64) -> Result<()> {
    let mut layer = tar::Builder::new(Vec::with_capacity(size as usize + (1 << 20)));
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let chunk = 1 << 20;
    for i in 0..size.div_ceil(chunk) {
        let n = chunk.min(size - i * chunk) as usize;
        let mut data = Vec::with_capacity(n);
        while data.len() < n {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            data.extend_from_slice(&x.to_le_bytes());
        }
        data.truncate(n);
        let mut h = tar::Header::new_gnu();
        h.set_size(n as u64);
        h.set_mode(0o644);
        layer.append_data(&mut h, format!("data/file{i:04}"), &data[..])?;
    }
    let layer = layer.into_inner()?;
    let diff = isla_image::digest::of_bytes(&layer);
    let config = serde_json::to_vec(
        &serde_json::json!({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": [diff.to_string()]}}),
    )?;
    let manifest = serde_json::to_vec(
        &serde_json::json!([{"Config": "config.json", "RepoTags": ["bench:1"], "Layers": ["layer/layer.tar"]}]),
    )?;
    let mut out = tar::Builder::new(std::fs::File::create(path).with_context(|| path.display().to_string())?);
    for (name, data) in [("config.json", &config), ("layer/layer.tar", &layer), ("manifest.json", &manifest)] {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        out.append_data(&mut h, name, &data[..])?;
    }
    out.into_inner()?.flush()?;
    Ok(())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn bench(root: &Path, size_mb: u64, runs: usize) -> Result<()> {
    if runs == 0 || size_mb == 0 {
        bail!("--runs and --size-mb must be at least 1");
    }
    let base = root.join("tmp").join(format!("bench-{}", std::process::id()));
    std::fs::create_dir_all(&base).with_context(|| base.display().to_string())?;
    let result = bench_in(&base, size_mb, runs);
    isla_image::store::remove_tree(&base);
    result
}

fn bench_in(base: &Path, size_mb: u64, runs: usize) -> Result<()> {
    let archive_path = base.join("layer.tar");
    make_archive(&archive_path, size_mb << 20)?;
    let mut import = Vec::new();
    for i in 0..3 {
        let store = Store::open(base.join(format!("import{i}")))?;
        let t = Instant::now();
        archive::load(&store, &archive_path)?;
        import.push(t.elapsed().as_secs_f64());
    }
    let m = median(&mut import);
    println!("import of a {size_mb} MiB layer (docker save archive, hash + store + unpack), median of 3: {m:.3} s ({:.0} MiB/s)", size_mb as f64 / m);

    let store = Store::open(base.join("rootfs"))?;
    busybox::busybox_image(&store, None)?;
    let mut prep = Vec::new();
    for i in 0..runs {
        let id = format!("bench{i}");
        let t = Instant::now();
        let r = store.prepare_rootfs(busybox::BUSYBOX_NAME, &id)?;
        r.mount()?;
        prep.push(t.elapsed().as_secs_f64() * 1000.0);
        r.unmount()?;
        store.remove_rootfs(&id)?;
    }
    let (min, max) = (prep.iter().cloned().fold(f64::MAX, f64::min), prep.iter().cloned().fold(0.0, f64::max));
    let m = median(&mut prep);
    println!("rootfs preparation (prepare_rootfs + overlay mount, busybox image), median of {runs}: {m:.2} ms (min {min:.2}, max {max:.2})");
    Ok(())
}
