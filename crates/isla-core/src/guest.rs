//! What the two VM drivers (microVM and full VM) share: the spec rules for guests, and the
//! main process (the monitor or QEMU) as recorded with its start time.

use isla_container::Signal;

use crate::error::{Error, Result};
use crate::model::{Instance, InstanceSpec, Kind};
use crate::proc::Owner;

/// The image name that means "the guest kit" (`isla run --kind microvm|vm kit`).
pub const KIT_IMAGE: &str = "kit";

/// Checks what a VM spec may hold: the kit (or, for microVMs, a container image), no volumes,
/// existing kernel and disk files.
pub fn check_spec(spec: &InstanceSpec) -> Result<()> {
    if let Some(img) = spec.image.as_deref().filter(|i| *i != KIT_IMAGE && spec.kind != Kind::Microvm) {
        return Err(Error::Unsupported(format!(
            "{} instances of container images (`{img}`) are not supported yet; use the image name `{KIT_IMAGE}` \
             (the guest kit), with --kernel/--rootfs for other kernels and disks, or --kind microvm",
            spec.kind
        )));
    }
    if !spec.volumes.is_empty() {
        let what = if spec.kind == Kind::Vm { "full VMs" } else { "microVMs" };
        return Err(Error::invalid(
            "-v",
            format!(
                "{what} take no volumes: host folders and named volumes are not shared into guests \
                 (isla has no virtio-fs yet); put the files on a disk image and give it with --rootfs"
            ),
        ));
    }
    for p in spec.kernel.iter().chain(&spec.rootfs) {
        if !p.is_file() {
            return Err(Error::invalid("--kernel/--rootfs", format!("{} is not a file", p.display())));
        }
    }
    Ok(())
}

/// The running main process, or an error saying it does not run.
pub fn main_process(inst: &Instance) -> Result<Owner> {
    inst.main_process().ok_or_else(|| Error::State {
        name: inst.spec.name.clone(),
        status: inst.status.to_string(),
        msg: format!(
            "its {} is not running (start it first)",
            if inst.spec.kind == Kind::Vm { "QEMU" } else { "monitor" }
        ),
    })
}

/// Sends `s` to the running main process.
pub fn signal(inst: &Instance, s: Signal) -> Result<()> {
    let m = main_process(inst)?;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(m.pid), s)
        .map_err(crate::error::sys(format!("signalling {}", inst.spec.name)))
}
