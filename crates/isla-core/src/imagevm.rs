//! Container images booted as microVMs (`isla run --kind microvm IMAGE [COMMAND...]`), the shape
//! of Kata Containers and firecracker-containerd: the guest kit's kernel and initramfs (with its
//! agent) boot, and the image's root file system arrives as a block device.
//!
//! - **Create**: the image's root is mounted as an overlay just long enough to check that the
//!   program exists there and, the first time, to build the image's read-only ext4 base disk
//!   (`isla_image::vmdisk`, cached per image configuration in the image store). The instance
//!   directory gets a hard link to that base (`base.ext4`, so garbage collection of the image
//!   cannot pull it away) and its own thin qcow2 overlay on it (`disk.qcow2`): made in
//!   milliseconds whatever the image's size, the base shared by every instance of the image,
//!   the instance's own writes kept until `rm` (as a container's upper directory is). The
//!   process (ENTRYPOINT + CMD or the command line, ENV with `-e`, WORKDIR or `-w`, USER) is
//!   fixed now, in `run.json`, as a container's bundle is.
//! - **Start**: `seed.img` is written afresh (`isla_agent::seed`: the run file with the host
//!   name, `/etc/hosts` and `resolv.conf`, and an empty status sector); the monitor gets the
//!   overlay as `/dev/vda`, the seed as `/dev/vdb`, and `isla.image=/dev/vda isla.seed=/dev/vdb`
//!   on the kernel command line, which the kit's init turns into: mount the image, mount
//!   `/proc`, `/sys`, `/dev`, `/tmp` in it, run the process there (the agent's `--image` mode,
//!   which also serves `isla exec` in the image's root), write its exit status into the seed's
//!   last sector, power off.
//! - **Exit**: the monitor exits 0 on power-off; [`exit_code`] reads the status sector, so the
//!   instance's exit code is the process's.

use std::path::{Path, PathBuf};

use isla_agent::seed::{self, RunFile};

use crate::container::{process_of, resolve_image};
use crate::driver::Env;
use crate::error::{io, Error, Result};
use crate::guest::KIT_IMAGE;
use crate::model::{Instance, InstanceSpec};

/// The guest devices of the two disks, in the order the monitor attaches them.
const IMAGE_DEV: &str = "/dev/vda";
const SEED_DEV: &str = "/dev/vdb";

/// Whether the spec boots a container image (not the guest kit).
pub(crate) fn is_image(spec: &InstanceSpec) -> bool {
    spec.image.as_deref().is_some_and(|i| i != KIT_IMAGE)
}

fn dir_file(env: &Env, inst: &Instance, name: &str) -> PathBuf {
    env.instance_dir(&inst.id).join(name)
}

/// Checks an image spec before anything is recorded: the image exists, has a process, no
/// `--rootfs` (the image is the root file system).
pub(crate) fn check(env: &Env, spec: &InstanceSpec) -> Result<()> {
    if spec.rootfs.is_some() {
        return Err(Error::invalid("--rootfs", "a container image is the microVM's root file system; drop --rootfs"));
    }
    if spec.kernel.is_some() {
        return Err(Error::invalid(
            "--kernel",
            "a container image boots on the guest kit's kernel and initramfs (its init runs the image); drop --kernel",
        ));
    }
    process_of(&resolve_image(env, spec)?, spec).map(drop)
}

/// The run file of `inst` (without the per-start host name and files).
fn run_file(inst: &Instance, img: &isla_image::Image) -> Result<RunFile> {
    let p = process_of(img, &inst.spec)?;
    let rf = RunFile {
        argv: p.args,
        env: p.env,
        workdir: p.cwd,
        uid: p.uid,
        gid: p.gid,
        hostname: inst.spec.name.clone(),
        hosts: String::new(),
        resolv_conf: String::new(),
    };
    rf.validate().map_err(|e| Error::invalid("command", e.to_string()))?;
    Ok(rf)
}

/// Makes the instance's disk (building the image's base disk the first time) and `run.json`.
pub(crate) fn create(env: &Env, inst: &Instance) -> Result<()> {
    let img = resolve_image(env, &inst.spec)?;
    let rf = run_file(inst, &img)?;
    let name = inst.spec.image.clone().unwrap_or_default();
    let (base, built) = env.images.with_image_root(&img, |root| {
        // A relative path with a slash is relative to the working directory, as for execvp.
        let prog = match &rf.argv[0] {
            p if p.contains('/') && !p.starts_with('/') => format!("{}/{p}", rf.workdir),
            p => p.clone(),
        };
        if isla_image::vmdisk::find_program(root, &prog, rf.path())?.is_none() {
            return Err(isla_image::Error::invalid(
                "command",
                format!(
                    "`{}` is not an executable file in image `{name}` (PATH={}); give a program the image has",
                    rf.argv[0],
                    rf.path()
                ),
            ));
        }
        env.images.vm_disk(&img, root)
    })?;
    if built {
        tracing::info!("built the microVM disk of {name}: {}", base.display());
    }
    let link = dir_file(env, inst, "base.ext4");
    // A hard link keeps the base alive while this instance exists; across file systems the
    // cached file itself is the backing file.
    let backing = match std::fs::hard_link(&base, &link) {
        Ok(()) => PathBuf::from("base.ext4"),
        Err(_) => base,
    };
    let opts = isla_disk::CreateOptions {
        format: isla_disk::Format::Qcow2,
        size: None,
        backing: Some((backing, isla_disk::Format::Raw)),
        cluster_size: None,
    };
    isla_disk::create(&dir_file(env, inst, "disk.qcow2"), &opts)?;
    let json = serde_json::to_vec_pretty(&rf).map_err(|e| Error::invalid("run file", e.to_string()))?;
    let p = dir_file(env, inst, "run.json");
    std::fs::write(&p, json).map_err(io(format!("writing {}", p.display())))
}

/// Writes the seed disk for this start and returns the monitor's extra arguments and kernel
/// command-line words. `attached`: the instance is on its network now (its hosts file exists).
pub(crate) fn start_args(env: &Env, inst: &Instance, attached: bool) -> Result<(Vec<String>, Vec<String>)> {
    let hosts = match inst.spec.network_name().filter(|_| attached) {
        Some(net) => Some(env.networks()?.hosts_file(net, &inst.id)?),
        None => None,
    };
    let p = dir_file(env, inst, "run.json");
    let text = std::fs::read(&p).map_err(io(format!("reading {}", p.display())))?;
    let mut rf: RunFile =
        serde_json::from_slice(&text).map_err(|e| Error::invalid(p.display().to_string(), e.to_string()))?;
    let name = &inst.spec.name;
    rf.hosts =
        hosts.unwrap_or_else(|| format!("127.0.0.1\tlocalhost {name}\n::1\tlocalhost ip6-localhost ip6-loopback\n"));
    rf.resolv_conf = match inst.spec.network_name() {
        Some(net) => crate::driver::instance_resolv_conf(env, &env.networks()?, net),
        None => String::new(),
    };
    let bytes = rf.to_seed().map_err(|e| Error::invalid("run file", e.to_string()))?;
    let seed = dir_file(env, inst, "seed.img");
    std::fs::write(&seed, bytes).map_err(io(format!("writing {}", seed.display())))?;
    let disk = dir_file(env, inst, "disk.qcow2");
    let args = vec!["--disk".into(), path_arg(&disk)?, "--disk".into(), path_arg(&seed)?];
    Ok((args, vec![format!("isla.image={IMAGE_DEV}"), format!("isla.seed={SEED_DEV}")]))
}

/// A path as a `--disk` argument (whose syntax has commas for options).
fn path_arg(p: &Path) -> Result<String> {
    match p.to_str() {
        Some(s) if !s.contains(',') => Ok(s.to_string()),
        _ => Err(Error::invalid(
            "--root",
            format!("{}: the monitor's --disk needs a UTF-8 path without ','", p.display()),
        )),
    }
}

/// The instance's exit code once its monitor exited with `code`: the status the guest wrote
/// into the seed disk, or, when there is none (the guest crashed, was stopped, or the process
/// never ran), the monitor's own code.
pub(crate) fn exit_code(env: &Env, inst: &Instance, code: i32) -> i32 {
    let seed = dir_file(env, inst, "seed.img");
    let status = std::fs::read(&seed).ok().and_then(|b| {
        let last = b.len().checked_sub(seed::SECTOR)?;
        seed::parse_status(&b[last..])
    });
    match status {
        Some(s) => s,
        None => {
            tracing::warn!("{}: the guest reported no exit status; the monitor's is {code}", inst.spec.name);
            code
        }
    }
}
