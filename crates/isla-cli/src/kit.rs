//! Finding and building the guest kit (guest/build.sh writes ~/.cache/isla/guest-kit.env).

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};

/// Paths of the guest kit.
pub struct Kit {
    pub vmlinux: PathBuf,
    pub bzimage: PathBuf,
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
            initramfs: get("ISLA_INITRAMFS")?,
            rootfs: get("ISLA_ROOTFS")?,
        })
    }

    pub fn print(&self) {
        println!("vmlinux   {}", self.vmlinux.display());
        println!("bzImage   {}", self.bzimage.display());
        println!("initramfs {}", self.initramfs.display());
        println!("rootfs    {}", self.rootfs.display());
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
