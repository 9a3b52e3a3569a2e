//! Busybox bundles for tests and benchmarks: a root file system made from Debian's
//! `busybox-static` (/bin/busybox and one symbolic link per applet) and a `config.json`.

use std::path::{Path, PathBuf};

use oci_spec::runtime::Spec;

/// Where Debian's busybox-static installs the binary.
pub const BUSYBOX: &str = "/bin/busybox";

/// A bundle in a directory that is removed on drop.
pub struct TestBundle {
    pub dir: PathBuf,
    pub spec: Spec,
}

impl TestBundle {
    /// A bundle under `parent/name` running `args` with the default spec minus the terminal.
    pub fn new(parent: &Path, name: &str, args: &[&str]) -> std::io::Result<TestBundle> {
        let dir = parent.join(name);
        let _ = std::fs::remove_dir_all(&dir);
        make_rootfs(&dir.join("rootfs"))?;
        let mut spec = crate::spec::default_spec(false);
        if let Some(p) = spec.process_mut() {
            p.set_terminal(Some(false));
            p.set_args(Some(args.iter().map(|s| s.to_string()).collect()));
        }
        if let Some(r) = spec.root_mut() {
            r.set_path("rootfs".into());
            r.set_readonly(Some(false));
        }
        Ok(TestBundle { dir, spec })
    }

    /// Write config.json from `spec`.
    pub fn write(&self) -> std::io::Result<()> {
        let json = serde_json::to_vec_pretty(&self.spec)?;
        std::fs::write(self.dir.join("config.json"), json)
    }
}

impl Drop for TestBundle {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Build a busybox root file system at `rootfs`.
pub fn make_rootfs(rootfs: &Path) -> std::io::Result<()> {
    for d in ["bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev", "tmp", "etc", "root"] {
        std::fs::create_dir_all(rootfs.join(d))?;
    }
    std::fs::copy(BUSYBOX, rootfs.join("bin/busybox"))?;
    let out = std::process::Command::new(BUSYBOX).arg("--list-full").output()?;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let target = rootfs.join(line);
        if line.is_empty() || line == "bin/busybox" || target.exists() {
            continue;
        }
        let depth = line.matches('/').count();
        let rel = format!("{}bin/busybox", "../".repeat(depth));
        let _ = std::os::unix::fs::symlink(rel, &target);
    }
    std::fs::write(
        rootfs.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/sh\n",
    )?;
    std::fs::write(rootfs.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n")?;
    Ok(())
}

/// On a hybrid cgroup host, move this process into a private mount namespace where
/// /sys/fs/cgroup/unified is unmounted, so that crun (which refuses hybrid hosts) runs with the
/// v1 controllers. Returns whether the host was hybrid. Affects this process and its children.
pub fn hide_unified_hierarchy() -> crate::Result<bool> {
    use nix::mount::{mount, umount2, MntFlags, MsFlags};
    let unified = Path::new("/sys/fs/cgroup/unified");
    if !unified.exists() {
        return Ok(false);
    }
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).map_err(crate::error::sys("unshare(CLONE_NEWNS)"))?;
    mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_SLAVE, None::<&str>)
        .map_err(crate::error::sys("making / a slave mount"))?;
    umount2(unified, MntFlags::MNT_DETACH).map_err(crate::error::sys("unmounting /sys/fs/cgroup/unified"))?;
    Ok(true)
}
