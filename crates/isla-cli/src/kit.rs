//! Finding and building the guest kit (guest/build.sh writes ~/.cache/isla/guest-kit.env).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// The kernel and initrd a boot uses. Given a kernel, the kernel and initrd as given. Without
/// one, the kit's kernel of `flavour`, and (unless an initrd is given) the kit's initramfs, which
/// is left out when the guest boots from a root disk (`root_disk`). `kit` is the kit when the
/// caller has it already; otherwise it is looked up only if it is needed.
pub fn boot_files(
    kit: Option<&Kit>,
    kernel: Option<&Path>,
    flavour: Flavour,
    initrd: Option<&Path>,
    root_disk: bool,
) -> Result<(PathBuf, Option<PathBuf>)> {
    let initrd = initrd.map(Path::to_path_buf);
    if let Some(k) = kernel {
        return Ok((k.to_path_buf(), initrd));
    }
    let found;
    let kit = match kit {
        Some(kit) => kit,
        None => {
            found = Kit::find()?;
            &found
        }
    };
    let default_initrd = (!root_disk).then(|| kit.initramfs.clone());
    Ok((kit.kernel(flavour, false).clone(), initrd.or(default_initrd)))
}

/// Paths of the guest kit.
pub struct Kit {
    /// The standard (unpatched) kernel.
    pub vmlinux: PathBuf,
    pub bzimage: PathBuf,
    /// The nested flavour, for hosts whose KVM emulates the guest kernel (docs/nested-kvm.md).
    pub nested_vmlinux: PathBuf,
    pub nested_bzimage: PathBuf,
    pub initramfs: PathBuf,
    pub rootfs: PathBuf,
}

fn cache_dir() -> PathBuf {
    std::env::var_os("ISLA_CACHE").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cache/isla")
    })
}

/// The guest/ directory of the source tree this binary was built from (or ISLA_GUEST_DIR).
fn guest_dir() -> PathBuf {
    std::env::var_os("ISLA_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../guest"))
}

impl Kit {
    /// Reads ~/.cache/isla/guest-kit.env.
    pub fn find() -> Result<Kit> {
        let env = cache_dir().join("guest-kit.env");
        let text = std::fs::read_to_string(&env)
            .with_context(|| format!("no guest kit at {} (build it with `isla guest build`)", env.display()))?;
        let get = |key: &str| -> Result<PathBuf> {
            let v = text
                .lines()
                .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
                .with_context(|| format!("{}: no {key}", env.display()))?;
            let p = PathBuf::from(v);
            if !p.exists() {
                bail!(
                    "{}: {key} names {}, which is missing (rebuild with `isla guest build`)",
                    env.display(),
                    p.display()
                );
            }
            Ok(p)
        };
        Ok(Kit {
            vmlinux: get("ISLA_KERNEL_VMLINUX")?,
            bzimage: get("ISLA_KERNEL_BZIMAGE")?,
            nested_vmlinux: get("ISLA_KERNEL_NESTED_VMLINUX")?,
            nested_bzimage: get("ISLA_KERNEL_NESTED_BZIMAGE")?,
            initramfs: get("ISLA_INITRAMFS")?,
            rootfs: get("ISLA_ROOTFS")?,
        })
    }

    /// The kernel of this flavour (`auto`: nested on nested PVM hosts, standard elsewhere).
    pub fn kernel(&self, flavour: Flavour, bzimage: bool) -> &PathBuf {
        match (flavour.resolve(), bzimage) {
            (Flavour::Nested, false) => &self.nested_vmlinux,
            (Flavour::Nested, true) => &self.nested_bzimage,
            (_, false) => &self.vmlinux,
            (_, true) => &self.bzimage,
        }
    }

    pub fn print(&self) {
        println!("vmlinux   {}", self.vmlinux.display());
        println!("bzImage   {}", self.bzimage.display());
        println!("nested-vmlinux {}", self.nested_vmlinux.display());
        println!("nested-bzImage {}", self.nested_bzimage.display());
        println!("initramfs {}", self.initramfs.display());
        println!("rootfs    {}", self.rootfs.display());
    }
}

/// Which guest-kit kernel to boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Flavour {
    /// Nested on nested (PVM) hosts, standard elsewhere.
    Auto,
    /// Unpatched, for hardware KVM.
    Standard,
    /// With the nested-host system-call fix-up.
    Nested,
}

impl Flavour {
    pub fn resolve(self) -> Flavour {
        match self {
            Flavour::Auto if isla_vmm::host::is_nested_pvm() => Flavour::Nested,
            Flavour::Auto => Flavour::Standard,
            f => f,
        }
    }
}

/// Runs guest/build.sh (cached builds return at once).
pub fn build() -> Result<Kit> {
    let script = guest_dir().join("build.sh");
    let status = Command::new("bash")
        .arg(&script)
        .stdout(std::process::Stdio::null())
        .status()
        .with_context(|| format!("running {}", script.display()))?;
    if !status.success() {
        bail!("{} failed ({status})", script.display());
    }
    Kit::find()
}
